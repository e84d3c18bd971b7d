"""A simulated village on one machine: a private broker, a serial bus on a
pseudo-terminal, the gateway as its own process, and residents pressing keys.

    python -m simulators.village                 # until Ctrl-C
    python -m simulators.village --duration 20   # then stop by itself

Everything it starts is stopped when it ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from firmware_protocol import Feedback, Key

from .caller import CounterFile, MqttBus, SerialBus, SimCaller

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"

KEY_WORDS = {
    Key.CALL: "GREEN (call the secretary)",
    Key.HANGUP: "RED (hang up)",
    Key.UP: "THUMBS UP (satisfied)",
    Key.DOWN: "THUMBS DOWN (not satisfied)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{name} is not installed; run: sudo apt-get install {name}")
    return path


class Village:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.mqtt_port = _free_port()
        self.gateway_tty = workdir / "ttyGATEWAY"
        self.bus_tty = workdir / "ttyBUS"
        self.config = workdir / "gateway.toml"

    def _start(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "mosquitto.conf").write_text(
            f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        )
        self._start("mosquitto", [_find("mosquitto"), "-c", str(self.workdir / "mosquitto.conf")],
                    self.workdir / "mosquitto.log")
        self._start("serial bus", [_find("socat"), f"pty,raw,echo=0,link={self.gateway_tty}",
                                   f"pty,raw,echo=0,link={self.bus_tty}"],
                    self.workdir / "socat.log")
        self._wait(lambda: self.gateway_tty.exists() and self.bus_tty.exists(), "the serial bus")
        self._wait(lambda: _listening(self.mqtt_port), "the MQTT broker")
        self.config.write_text(
            f"# Written by simulators.village from {CONFIG}/gateway.toml\n"
            '[village]\nid = "xiaowang"\nname = "小王村"\n\n'
            f'[store]\npath = "{self.workdir / "gateway.db"}"\n\n'
            f'[files]\nresidents = "{CONFIG / "residents.toml"}"\n'
            f'people = "{CONFIG / "people.toml"}"\nroster = "{CONFIG / "roster.toml"}"\n\n'
            f'[[links.serial]]\nname = "bus1"\nport = "{self.gateway_tty}"\n\n'
            f"[links.mqtt]\nhost = \"127.0.0.1\"\nport = {self.mqtt_port}\n\n"
            '[clock]\ntrust = "always"\n\n[log]\nformat = "json"\n'
        )
        self._start("gateway", [sys.executable, "-m", "gateway", "run", "--config",
                                str(self.config)], self.workdir / "gateway.log")
        self._wait(self._gateway_ready, "the gateway", timeout=30)

    def _gateway_ready(self) -> bool:
        log = self.workdir / "gateway.log"
        return log.exists() and '"gateway ready"' in log.read_text(errors="replace")

    def _wait(self, predicate: object, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with code {proc.returncode}; "
                                     f"see {self.workdir}/*.log")
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _residents() -> dict[int, tuple[str, str, bytes]]:
    from gateway.config import load_residents

    return {c.id: (c.resident, c.address, c.key_bytes)
            for c in load_residents(CONFIG / "residents.toml").caller}


async def _drive(village: Village, duration: float | None, every: float, seed: int | None) -> int:
    rng = random.Random(seed)
    people = _residents()
    ids = sorted(people)
    counters = CounterFile(village.workdir / "counters.json")
    serial_bus = SerialBus(str(village.bus_tty))
    mqtt_bus = MqttBus("127.0.0.1", village.mqtt_port, "onetouch/xiaowang")

    def shown(caller: SimCaller, fb: Feedback) -> None:
        color, pattern = caller.led
        _say(f"caller {caller.device_id} shows {color.name.lower()} {pattern.name.lower()} "
             f"({fb.state.name.lower().replace('_', ' ')})")

    callers: dict[int, tuple[SimCaller, str]] = {}
    for i, device_id in enumerate(ids):
        bus: SerialBus | MqttBus = serial_bus if i % 2 == 0 else mqtt_bus
        sim = SimCaller(device_id, people[device_id][2], counters, bus.send, on_feedback=shown)
        bus.callers[device_id] = sim
        callers[device_id] = (sim, "serial bus" if bus is serial_bus else "MQTT")
    acked = failed = 0
    async with serial_bus, mqtt_bus:
        _say(f"{len(ids)} callers online ({len(serial_bus.callers)} on the serial bus, "
             f"{len(mqtt_bus.callers)} over MQTT); Ctrl-C stops the village")
        for sim, _ in callers.values():
            await sim.heartbeat()
        stop_at = None if duration is None else time.monotonic() + duration
        tasks: set[asyncio.Task[None]] = set()

        async def press(device_id: int) -> None:
            nonlocal acked, failed
            sim, via = callers[device_id]
            name, address, _ = people[device_id]
            key = rng.choices(list(Key), weights=[5, 2, 2, 1])[0]
            _say(f"{name} ({address}, caller {device_id}) presses {KEY_WORDS[key]}")
            result = await sim.press(key, give_up_s=30)
            if result.acked:
                acked += 1
                _say(f"  -> gateway stored it and acknowledged in {result.latency_s * 1000:.1f} ms"
                     f" over {via}")
            else:
                failed += 1
                _say(f"  -> NOT acknowledged after {result.attempts} tries over {via}")

        while stop_at is None or time.monotonic() < stop_at:
            await asyncio.sleep(rng.uniform(0.3, 2 * every))
            task = asyncio.create_task(press(rng.choice(ids)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    counters.flush()
    _say(f"presses acknowledged: {acked}, not acknowledged: {failed}")
    print(json.dumps({"acknowledged": acked, "not_acknowledged": failed}), flush=True)
    return 0 if failed == 0 else 1


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


@contextlib.contextmanager
def _village(workdir: Path) -> Iterator[Village]:
    village = Village(workdir)
    try:
        village.start()
        _say("started " + ", ".join(f"{n} (pid {p.pid})" for n, p in village.procs))
        _say(f"gateway log: {workdir / 'gateway.log'}   database: {workdir / 'gateway.db'}")
        yield village
    finally:
        village.stop()
        _say("stopped " + ", ".join(f"{n} (pid {p.pid})" for n, p in village.procs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.village", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--every", type=float, default=2.0, help="mean seconds between presses")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable village")
    parser.add_argument("--workdir", type=Path, default=REPO / "var" / "village",
                        help="where the database, logs and ptys go (default var/village)")
    args = parser.parse_args(argv)
    # SIGTERM ends the village as Ctrl-C does, stopping everything it started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with _village(args.workdir) as village:
            return asyncio.run(_drive(village, args.duration, args.every, args.seed))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
