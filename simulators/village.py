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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from firmware_protocol import CallerState, Feedback, Key

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
        # The 4G module: phones that are rung never answer (people answer in
        # the app), texts are delivered.
        self.modem_tty = self.workdir / "ttyMODEM"
        self._start("4G modem", [sys.executable, "-m", "simulators.modem", "--link",
                                 str(self.modem_tty)], self.workdir / "modem.log")
        self._wait(lambda: self.modem_tty.exists(), "the modem simulator")
        self._wait(lambda: _listening(self.mqtt_port), "the MQTT broker")
        self.config.write_text(
            f"# Written by simulators.village from {CONFIG}/gateway.toml\n"
            '[village]\nid = "xiaowang"\nname = "小王村"\n\n'
            f'[store]\npath = "{self.workdir / "gateway.db"}"\n\n'
            f'[files]\nresidents = "{CONFIG / "residents.toml"}"\n'
            f'people = "{CONFIG / "people.toml"}"\nroster = "{CONFIG / "roster.toml"}"\n\n'
            f'[[links.serial]]\nname = "bus1"\nport = "{self.gateway_tty}"\n\n'
            f"[links.mqtt]\nhost = \"127.0.0.1\"\nport = {self.mqtt_port}\n\n"
            # The district's broker is this same private broker in the demo.
            f'[modem]\nport = "{self.modem_tty}"\nring_s = 10\n\n'
            f"[sync]\nhost = \"127.0.0.1\"\nport = {self.mqtt_port}\npoll_interval_s = 0.5\n\n"
            '[clock]\ntrust = "always"\n\n[log]\nformat = "json"\n'
        )
        self._start("district store", [sys.executable, "-m", "simulators.central_store",
                                       "--mqtt", f"127.0.0.1:{self.mqtt_port}",
                                       "--db", f"sqlite:{self.workdir / 'district.db'}",
                                       "serve"], self.workdir / "district.log")
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


# How the example village's people answer their app in the demo: quickly, so a
# whole case fits in a few seconds.
PERSONAS = {
    "wang-shuji": "accept:2,arrived:4,resolved:6",
    "li-fushuji": "accept:2,arrived:4,resolved:6",
    "chen-wangge2": "accept:3,arrived:5,resolved:7",
    "liu-wangge3": "accept:3,arrived:5,resolved:7",
}


async def _tail_json(log_path: Path, show: Callable[[dict[str, Any]], None]) -> None:
    """Follow a file of JSON lines as it grows, as `tail -f` would."""
    offset = 0
    while True:
        await asyncio.sleep(0.2)
        try:
            with log_path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            continue
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            continue
        offset += last_newline + 1
        for raw in chunk[: last_newline + 1].splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict):
                show(event)


def _show_gateway(names: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    """Tell the story from the gateway's own log: cases, who is called, answers."""

    def show(e: dict[str, Any]) -> None:
        event = e.get("event")
        if event == "case":
            who = names.get(str(e.get("current")), e.get("current"))
            _say(f"  gateway: case {e['case']} is {e['state']}"
                 + (f", waiting for {who}" if e.get("current") and e["state"] == "notifying"
                    else ""))
        elif event == "person notified":
            _say(f"  gateway: told {names.get(e['person'], e['person'])} by "
                 f"{e['channel']} ({e['kind']})")
        elif event == "channel failed; trying the next":
            _say(f"  gateway: {e['channel']} to {names.get(e['person'], e['person'])} "
                 f"failed ({e.get('detail')}); trying the next")
        elif event in ("app answer", "SMS answer"):
            _say(f"  gateway: {names.get(e['person'], e['person'])} answered "
                 f"{e['answer']} for case {e['case']}")
        elif e.get("level") in ("error", "critical"):
            _say(f"  gateway ERROR: {event} {e.get('problem') or e.get('error') or ''}")

    return show


def _show_district(e: dict[str, Any]) -> None:
    if e.get("event") == "batch committed" and e.get("new"):
        _say(f"  district: case store committed {e['new']} new record(s) "
             f"from {e.get('village')}")


def _show_modem(e: dict[str, Any]) -> None:
    number = str(e.get("number", ""))
    masked = number[:3] + "****" + number[-4:] if len(number) > 7 else number
    if e.get("event") == "sms":
        _say(f"  modem: text to {masked}: {e.get('text')}")
    elif e.get("event") == "call":
        _say(f"  modem: ringing {masked}")


async def _drive(village: Village, duration: float | None, every: float, seed: int | None) -> int:
    from gateway.config import load

    from .app import Phone, parse_persona

    rng = random.Random(seed)
    residents = _residents()
    ids = sorted(residents)
    loaded = load(village.config)
    names = {pid: p.name for pid, p in loaded.village.people.items()}
    counters = CounterFile(village.workdir / "counters.json")
    serial_bus = SerialBus(str(village.bus_tty))
    mqtt_bus = MqttBus("127.0.0.1", village.mqtt_port, "onetouch/xiaowang")
    led: dict[int, CallerState] = {}

    def shown(caller: SimCaller, fb: Feedback) -> None:
        led[caller.device_id] = fb.state
        color, pattern = caller.led
        _say(f"  caller {caller.device_id} shows {color.name.lower()} "
             f"{pattern.name.lower().replace('_', ' ')}: "
             f"{fb.state.name.lower().replace('_', ' ')}")

    callers: dict[int, tuple[SimCaller, str]] = {}
    for i, device_id in enumerate(ids):
        bus: SerialBus | MqttBus = serial_bus if i % 2 == 0 else mqtt_bus
        sim = SimCaller(device_id, residents[device_id][2], counters, bus.send, on_feedback=shown)
        bus.callers[device_id] = sim
        callers[device_id] = (sim, "serial bus" if bus is serial_bus else "MQTT")
    phones = [
        Phone(p, parse_persona(PERSONAS.get(pid, "ignore")), "127.0.0.1", village.mqtt_port,
              loaded.gateway.topic_prefix, lambda text: _say(f"  phone: {text}"))
        for pid, p in loaded.village.people.items()
        if p.app_id and p.app_key
    ]
    acked = failed = cases = rated = 0
    work = village.workdir
    background = [
        asyncio.create_task(_tail_json(work / "gateway.log", _show_gateway(names))),
        asyncio.create_task(_tail_json(work / "district.log", _show_district)),
        asyncio.create_task(_tail_json(work / "modem.log", _show_modem)),
    ]
    background += [asyncio.create_task(phone.run()) for phone in phones]
    try:
        async with serial_bus, mqtt_bus:
            _say(f"{len(ids)} callers online ({len(serial_bus.callers)} on the serial bus, "
                 f"{len(mqtt_bus.callers)} over MQTT), {len(phones)} phones with the app; "
                 "Ctrl-C stops the village")
            for sim, _ in callers.values():
                await sim.heartbeat()
            stop_at = None if duration is None else time.monotonic() + duration

            async def press(device_id: int, key: Key) -> bool:
                nonlocal acked, failed
                sim, via = callers[device_id]
                name, address, _ = residents[device_id]
                _say(f"{name} ({address}, caller {device_id}) presses {KEY_WORDS[key]}")
                result = await sim.press(key, give_up_s=30)
                if result.acked:
                    acked += 1
                    _say(f"  gateway stored it and acknowledged in "
                         f"{result.latency_s * 1000:.1f} ms over {via}")
                else:
                    failed += 1
                    _say(f"  NOT acknowledged after {result.attempts} tries over {via}")
                return result.acked

            async def until(device_id: int, state: CallerState, within_s: float) -> bool:
                end = time.monotonic() + within_s
                while led.get(device_id) is not state:
                    if time.monotonic() > end:
                        return False
                    await asyncio.sleep(0.1)
                return True

            while stop_at is None or time.monotonic() < stop_at:
                device_id = rng.choice(ids)
                led.pop(device_id, None)
                if not await press(device_id, Key.CALL):
                    continue
                cases += 1
                # The resident waits for help, then says how it went.
                if await until(device_id, CallerState.HELP_COMING, 60) and await until(
                    device_id, CallerState.IDLE, 60
                ):
                    await asyncio.sleep(1.0)
                    key = Key.UP if rng.random() < 0.8 else Key.DOWN
                    if await press(device_id, key):
                        rated += 1
                        await until(device_id, CallerState.THANKS, 10)
                await asyncio.sleep(rng.uniform(0.5, every))
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    counters.flush()
    _say(f"cases: {cases}, rated: {rated}; presses acknowledged: {acked}, "
         f"not acknowledged: {failed}")
    print(json.dumps({"cases": cases, "rated": rated, "acknowledged": acked,
                      "not_acknowledged": failed}), flush=True)
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
