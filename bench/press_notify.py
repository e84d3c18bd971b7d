"""Press to first notification: from the byte leaving a simulated caller to the
secretary app's push arriving, through the real daemon, over MQTT and serial.

    .venv/bin/python -m bench.press_notify [--runs 3] [--callers 100,1000,10000]
    .venv/bin/python -m bench.press_notify --quick          # under a minute
    .venv/bin/python -m bench.press_notify --tap ...        # split the gateway's share

Every press is a green key from a caller with no open case, so each one opens a
case and the desk's first action is a push to the on-duty secretary's app (the
first channel in people.toml).  This process subscribes to the app's topic and
timestamps each push with the monotonic clock it timed the press with; a push
is matched to its press by the case id, which names the caller and the press's
counter.  The ACK of each press is timed on the way too.

A caller presses once per measurement; when a village runs out of callers who
have not pressed yet, a fresh one is started.  With fewer callers than presses
the measurement has as many presses as there are callers (the ``presses``
column).

``--tap`` adds a separate process on the broker that timestamps the press, the
ACK and the push as they pass.  Its figures (``gw_ack``, ``gw_notify``) are the
gateway's own share: from the press leaving the broker to the ACK or push
arriving at it.  The rest of a latency is the load generator's share, which
runs on the same cores as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt

from firmware_protocol import Ack, Frame, KeyPress, decode_frame
from simulators.caller import MqttBus, SerialBus, SimCaller

from ._village import REPO, STEADY_RATE, Running, pct, press_green, report, village

STEADY_PRESSES = 300
BURST = 200
NOTIFY_WAIT_S = 15.0


class Pool:
    """Villages of callers who have not pressed yet; a fresh village when one runs out."""

    def __init__(self, callers: int, seed: int) -> None:
        self.callers = callers
        self._rng = random.Random(seed)
        self._stack = contextlib.ExitStack()
        self.run: Running | None = None
        self._unused: list[int] = []
        self.villages = 0

    def take(self, n: int) -> tuple[Running, list[int]]:
        n = min(n, self.callers)
        if self.run is None or len(self._unused) < n:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            self.run = self._stack.enter_context(village(self.callers))
            self._unused = sorted(self.run.keys)
            self._rng.shuffle(self._unused)
            self.villages += 1
        ids, self._unused = self._unused[:n], self._unused[n:]
        return self.run, ids

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def _tap(run: Running, out: Path) -> Iterator[Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._tap", "--port", str(run.mqtt_port), "--prefix", run.prefix,
         "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"subscribed":
            raise SystemExit("the wire tap did not start")
        yield out
    finally:
        proc.terminate()
        proc.wait(30)


def _tap_shares(
    out: Path, presses: dict[tuple[int, int], float]
) -> tuple[list[float], list[float]]:
    """Gateway-side latencies seen on the wire: press at the broker to its ACK and push."""
    up: dict[tuple[int, int], float] = {}
    ack: dict[tuple[int, int], float] = {}
    push: dict[tuple[int, int], float] = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        topic: str = rec["topic"]
        if topic.endswith("/notify"):
            note = json.loads(bytes.fromhex(rec["payload"]))
            dev, _, counter = str(note.get("case_id") or "").partition("-")
            if dev.isdigit() and counter.isdigit():
                push.setdefault((int(dev), int(counter)), rec["t"])
            continue
        item = decode_frame(bytes.fromhex(rec["payload"]))
        if not isinstance(item, Frame):
            continue
        if topic.endswith("/up") and isinstance(item.message, KeyPress):
            up.setdefault((item.device_id, item.counter), rec["t"])
        elif topic.endswith("/down") and isinstance(item.message, Ack):
            ack.setdefault((item.device_id, item.message.acked_counter), rec["t"])
    gw_ack = [(ack[k] - up[k]) * 1000 for k in presses if k in up and k in ack]
    gw_push = [(push[k] - up[k]) * 1000 for k in presses if k in up and k in push]
    return gw_ack, gw_push


async def _measure(
    run: Running, ids: list[int], transport: str, mode: str, tap: Path | None
) -> dict[str, Any]:
    counters = run.counters
    bus: MqttBus | SerialBus
    if transport == "mqtt":
        bus = MqttBus("127.0.0.1", run.mqtt_port, run.prefix)
    else:
        bus = SerialBus(str(run.bus_tty), 115200)
    started: dict[int, float] = {}

    async def send(device_id: int, frame: bytes) -> None:
        # Each caller presses once here and its press is its first frame.
        started.setdefault(device_id, time.monotonic())
        await bus.send(device_id, frame)

    callers = [SimCaller(d, run.keys[d], counters, send) for d in ids]
    bus.callers.update({c.device_id: c for c in callers})
    pushed: dict[tuple[int, int], float] = {}
    everyone = asyncio.Event()
    wanted: set[tuple[int, int]] = set()

    async def watch(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            at = time.monotonic()
            note = json.loads(message.payload)  # type: ignore[arg-type]
            if note.get("kind") not in ("call", "urgent_call"):
                continue
            dev, _, counter = str(note.get("case_id") or "").partition("-")
            if dev.isdigit() and counter.isdigit():
                pushed.setdefault((int(dev), int(counter)), at)
                if wanted and wanted <= pushed.keys():
                    everyone.set()

    gw_cpu0 = run.cpu_seconds()
    gen_cpu0 = time.process_time()
    async with aiomqtt.Client(
        "127.0.0.1", run.mqtt_port, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    ) as app:
        await app.subscribe(f"{run.prefix}/app/+/notify", qos=1)
        watcher = asyncio.create_task(watch(app))
        async with bus:
            results = await press_green(callers, mode)
            keys = {
                (c.device_id, r.counter): c.device_id for c, r in zip(callers, results, strict=True)
            }
            wanted.update(keys)
            if not wanted <= pushed.keys():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(everyone.wait(), NOTIFY_WAIT_S)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    gw_cpu = run.cpu_seconds() - gw_cpu0
    gen_cpu = time.process_time() - gen_cpu0
    unacked = sum(not r.acked for r in results)
    if unacked:
        raise SystemExit(f"{unacked} presses not acknowledged ({transport} {mode})")
    ack_ms = [r.latency_s * 1000 for r in results]
    notify_ms = [(pushed[k] - started[d]) * 1000 for k, d in keys.items() if k in pushed]
    out: dict[str, Any] = {
        "ack": ack_ms, "notify": notify_ms, "missing": len(keys) - len(notify_ms),
        "gw_cpu_ms": gw_cpu * 1000 / len(results), "gen_cpu_ms": gen_cpu * 1000 / len(results),
    }  # fmt: skip
    if tap is not None:
        out["keys"] = {k: started[d] for k, d in keys.items()}
    return out


def _row(callers: int, transport: str, mode: str, runs: list[dict[str, Any]]) -> dict[str, object]:
    def med(key: str, q: float | None) -> float:
        vals = [statistics.median(r[key]) if q is None else pct(r[key], q) for r in runs if r[key]]
        return round(statistics.median(vals), 2) if vals else float("nan")

    row: dict[str, object] = {
        "callers": callers,
        "link": transport,
        "load": f"{STEADY_RATE:.0f}/s steady" if mode == "steady" else "all at once",
        "presses": len(runs[0]["ack"]),
        "notify_median_ms": med("notify", None),
        "notify_p99_ms": med("notify", 0.99),
        "ack_median_ms": med("ack", None),
        "ack_p99_ms": med("ack", 0.99),
        "missing": sum(r["missing"] for r in runs),
        "gw_cpu_ms_per_press": round(statistics.median(r["gw_cpu_ms"] for r in runs), 3),
        "gen_cpu_ms_per_press": round(statistics.median(r["gen_cpu_ms"] for r in runs), 3),
    }
    if "gw_ack" in runs[0]:
        row["gw_ack_median_ms"] = med("gw_ack", None)
        row["gw_ack_p99_ms"] = med("gw_ack", 0.99)
        row["gw_notify_median_ms"] = med("gw_notify", None)
        row["gw_notify_p99_ms"] = med("gw_notify", 0.99)
    row["runs"] = len(runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", default="100,1000,10000")
    parser.add_argument("--links", default="mqtt,serial")
    parser.add_argument("--modes", default="steady,burst")
    parser.add_argument("--tap", action="store_true", help="time the gateway's share on the wire")
    parser.add_argument("--quick", action="store_true", help="1,000 callers, one run")
    parser.add_argument("--name", default="press_notify", help="results file name")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.callers = 1, "1000"
    rows: list[dict[str, object]] = []
    for n in (int(x) for x in args.callers.split(",")):
        pool = Pool(n, seed=n)
        try:
            for transport in args.links.split(","):
                for mode in args.modes.split(","):
                    runs = []
                    for _ in range(args.runs):
                        run, ids = pool.take(STEADY_PRESSES if mode == "steady" else BURST)
                        if args.tap:
                            out = run.workdir / f"tap-{time.monotonic_ns()}.jsonl"
                            with _tap(run, out):
                                m = asyncio.run(_measure(run, ids, transport, mode, out))
                            m["gw_ack"], m["gw_notify"] = _tap_shares(out, m.pop("keys"))
                        else:
                            m = asyncio.run(_measure(run, ids, transport, mode, None))
                        runs.append(m)
                    rows.append(_row(n, transport, mode, runs))
                    print(rows[-1], flush=True)
        finally:
            pool.close()
    report(
        args.name,
        rows,
        {
            "what": "press to the first app push (and to the ACK), ms; median over runs of each "
            "run's median / 99th percentile",
            "tap": args.tap,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
