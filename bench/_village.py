"""Shared scaffolding for benchmarks: a private broker, a pty bus, the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from firmware_protocol import Key
from simulators.caller import CounterFile, PressResult, SimCaller

REPO = Path(__file__).resolve().parent.parent
# Taken when a benchmark starts: the machines are shared, and a figure means
# little without knowing what else was running.
_LOAD_AT_START = os.getloadavg()


STEADY_RATE = 50.0  # presses per second in the "steady" load


async def press_green(callers: list[SimCaller], mode: str) -> list[PressResult]:
    """Every caller presses green: all at once ("burst") or at STEADY_RATE."""
    if mode == "burst":
        return await asyncio.gather(*(c.press(Key.CALL, give_up_s=30) for c in callers))
    tasks = []
    for c in callers:
        tasks.append(asyncio.create_task(c.press(Key.CALL, give_up_s=30)))
        await asyncio.sleep(1 / STEADY_RATE)
    return await asyncio.gather(*tasks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(x, 2) for x in _LOAD_AT_START],
    }


def pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (q=0.99 of 200 values is the second largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_residents(path: Path, n: int) -> dict[int, bytes]:
    keys = {1_000_000 + i: hashlib.sha256(f"bench-{i}".encode()).digest()[:16] for i in range(n)}
    lines = []
    for device_id, key in keys.items():
        lines += [
            "[[caller]]",
            f"id = {device_id}",
            f'key = "{key.hex()}"',
            f'resident = "resident {device_id}"',
            'grid = "grid-1"',
            "",
        ]
    path.write_text("\n".join(lines))
    return keys


class MemoryCounters(CounterFile):
    """A caller's frame counters kept in memory only.

    The simulator writes its whole counter file each time a caller it has not
    seen before sends a frame, as firmware writes flash; with thousands of
    callers pressing at once that is the load generator's time, not the
    gateway's, and it grows with every caller that pressed before.  One of
    these per village keeps every counter rising, as a file would.
    """

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/bench-counters.json"))

    def _save(self) -> None:
        pass


@dataclass
class Running:
    workdir: Path
    mqtt_port: int
    bus_tty: Path
    gateway: subprocess.Popen[bytes]
    keys: dict[int, bytes]
    prefix: str = "onetouch/bench"
    counters: MemoryCounters = field(default_factory=MemoryCounters)
    broker_pid: int = 0
    started_at: float = 0.0  # time.monotonic() just before the daemon was started

    @property
    def db(self) -> Path:
        return self.workdir / "gateway.db"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.gateway.pid)

    def broker_cpu_seconds(self) -> float:
        return cpu_seconds(self.broker_pid) if self.broker_pid else float("nan")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.gateway.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def _find(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{name} is needed: apt-get install {name}")
    return path


@contextlib.contextmanager
def village(
    callers: int,
    *,
    prepare: Callable[[Path], None] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Running]:
    """A private broker, a pty bus and the daemon on them, with ``callers`` registered.

    ``prepare(workdir)`` runs once the configuration is written and before the
    daemon starts (to put a database in place); ``env`` is added to the
    daemon's environment.
    """
    with tempfile.TemporaryDirectory(prefix="onetouch-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\n"
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(
                subprocess.Popen(
                    [_find("mosquitto"), "-c", str(work / "mosquitto.conf")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            gw_tty, bus_tty = work / "ttyGW", work / "ttyBUS"
            procs.append(
                subprocess.Popen(
                    [
                        _find("socat"),
                        f"pty,raw,echo=0,link={gw_tty}",
                        f"pty,raw,echo=0,link={bus_tty}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            keys = write_residents(work / "residents.toml", callers)
            (work / "gateway.toml").write_text(
                '[village]\nid = "bench"\n[store]\npath = "gateway.db"\n'
                f'[files]\nresidents = "residents.toml"\npeople = "{REPO / "config/people.toml"}"\n'
                f'roster = "{REPO / "config/roster.toml"}"\n'
                f'[[links.serial]]\nname = "bus1"\nport = "{gw_tty}"\nbaudrate = 115200\n'
                f'[links.mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
                '[clock]\ntrust = "always"\n[log]\nformat = "json"\nlevel = "warning"\n'
            )
            deadline = time.monotonic() + 10
            while not (gw_tty.exists() and bus_tty.exists()):
                if time.monotonic() > deadline:
                    raise SystemExit("socat did not start")
                time.sleep(0.02)
            if prepare is not None:
                prepare(work)
            log = (work / "gateway.log").open("wb")
            started = time.monotonic()
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(work / "gateway.toml")],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
            procs.append(gateway)
            # At level warning the ready line is not logged; the database and the
            # broker session tell us instead.
            _wait_ready(work, gateway, port)
            try:
                yield Running(
                    work, port, bus_tty, gateway, keys, broker_pid=procs[0].pid, started_at=started
                )
            except BaseException:
                # Keep the evidence: the temporary folder goes with this block.
                kept = REPO / "bench" / "results" / "failed-gateway.log"
                kept.parent.mkdir(exist_ok=True)
                shutil.copy(work / "gateway.log", kept)
                print(f"gateway log kept in {kept}", file=sys.stderr)
                raise
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in reversed(procs):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def _wait_ready(work: Path, gateway: subprocess.Popen[bytes], port: int) -> None:
    import aiomqtt  # noqa: F401  (fail early if the environment is wrong)

    deadline = time.monotonic() + 60
    probe = [
        sys.executable,
        "-c",
        "import asyncio, aiomqtt, sys\n"
        "async def m():\n"
        f"    async with aiomqtt.Client('127.0.0.1', {port}) as c:\n"
        "        await c.subscribe('onetouch/bench/gateway/status', qos=1)\n"
        "        async for msg in c.messages:\n"
        "            sys.exit(0 if msg.payload == b'online' else 1)\n"
        "asyncio.run(asyncio.wait_for(m(), 3))\n",
    ]
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise SystemExit(f"gateway exited: {(work / 'gateway.log').read_text()[-2000:]}")
        if subprocess.run(probe, capture_output=True).returncode == 0:
            time.sleep(0.5)  # the serial link opens in parallel
            return
        time.sleep(0.2)
    raise SystemExit("gateway not ready within 60 s")


def report(
    name: str, rows: list[dict[str, object]], extra: dict[str, object], *, quick: bool = False
) -> None:
    # A --quick run is a smoke test: it must not overwrite the figures the README reports.
    name = f"{name}_quick" if quick else name
    out = {"benchmark": name, "machine": machine(), **extra, "rows": rows}
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if rows:
        cols = list(rows[0])
        widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    print(f"machine: {out['machine']}")
    print(f"written: {results / (name + '.json')}")
