"""Sustained intake: durable, acknowledged events per second until saturation,
CPU time per event, and the plain-SQLite group-commit limit for the same rows.

    .venv/bin/python -m bench.intake [--runs 3] [--callers 10000] [--step-s 5]
    .venv/bin/python -m bench.intake --quick            # under a minute

First the limit: plain ``sqlite3`` in this process, with the gateway's own
schema and PRAGMAs (WAL, ``synchronous=FULL``), inserting the rows the gateway
writes for each event in transactions of the gateway's batch size.  Then the
real daemon (a subprocess) under a rising offered load from thousands of
simulated callers over MQTT, step by step, until the rate of acknowledged
events stops rising.  An event counts when its ACK reaches the caller, which
the gateway sends only after the commit.

Two loads: heartbeats only, and mixed (one green press in every
``--press-every`` events; a press opens a case, notifies the secretary and
lights the caller, or, from a caller whose case is open, is a green press
again).  The CPU figures are user + system time from /proc of the daemon, the
broker and this process (the load generator), divided by the events the step
acknowledged.  All of them share the same cores: the generator's and the
broker's CPU is time the gateway could not have.

Serial is not measured here: at 115,200 baud the line carries about 300
frames a second, far below what the gateway takes over MQTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware_protocol import Ack, Frame, Key
from gateway.store import _MIGRATIONS
from simulators.caller import MqttBus, SimCaller

from ._village import Running, report, village
from .sync_drain import _case

BATCH = 256  # the gateway's [intake] max_batch default: the most one commit takes
RATES = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000)
TICK_S = 0.01
DRAIN_S = 30.0


# -- the limit: plain SQLite -----------------------------------------------------------


def _baseline(events: int, press_every: int | None, batch: int = BATCH) -> float:
    """Events per second plain sqlite3 commits, ``batch`` events per transaction."""
    with tempfile.TemporaryDirectory(prefix="onetouch-sqlite-bench-") as tmp:
        db = sqlite3.connect(Path(tmp) / "plain.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        for script in _MIGRATIONS:
            db.executescript(f"BEGIN;\n{script}\nCOMMIT;")
        mac = os.urandom(8)
        case = json.dumps(_case("1000000-1", 1_000_000, 1), separators=(",", ":"))
        start = time.perf_counter()
        for first in range(0, events, batch):
            now = time.time()
            beats, presses = [], []
            for i in range(first, min(events, first + batch)):
                device, counter = 1_000_000 + i % 10_000, 1 + i // 10_000
                if press_every and i % press_every == 0:
                    presses.append((device, counter))
                else:
                    beats.append((device, counter, "heartbeat", None, 3000, 87, -71, 0, 0,
                                  "mqtt", now, 1, mac))  # fmt: skip
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO events (device_id, counter, kind, key, battery_mv, battery_pct, "
                "signal_dbm, external_power, low_battery, link, received_at, wall_trusted, mac) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                beats + [(d, c, "key", 1, None, None, None, None, None, "mqtt", now, 1, mac)
                         for d, c in presses],
            )  # fmt: skip
            if presses:
                # What a press that opens a case adds: the case, its district
                # record and the record of the first notification.
                db.executemany(
                    "INSERT INTO cases (id, device_id, state, open, opened_at, updated_at, data) "
                    "VALUES (?, ?, 'notifying', 1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "data = excluded.data",
                    [(f"{d}-{c}", d, now, now, case) for d, c in presses],
                )
                db.executemany(
                    "INSERT INTO outbox (kind, case_id, created_at, wall_trusted, payload) "
                    "VALUES ('case', ?, ?, 1, ?)",
                    [(f"{d}-{c}", now, case) for d, c in presses],
                )
                db.executemany(
                    "INSERT INTO notifications (at, case_id, person_id, kind, channel, outcome) "
                    "VALUES (?, ?, 'wang-shuji', 'call', 'app', 'sent')",
                    [(now, f"{d}-{c}") for d, c in presses],
                )
            db.execute("COMMIT")
        elapsed = time.perf_counter() - start
        db.close()
    return events / elapsed


# -- the daemon --------------------------------------------------------------------------


class _Counted(SimCaller):
    """A simulated caller whose ACKs are counted, once per acknowledged frame."""

    acked: dict[tuple[int, int], float]

    def received(self, frame: Frame) -> None:
        if isinstance(frame.message, Ack):
            self.acked.setdefault((self.device_id, frame.message.acked_counter), time.monotonic())
        super().received(frame)


class _Load:
    def __init__(self, run: Running, press_every: int | None) -> None:
        self.run = run
        self.press_every = press_every
        self.acked: dict[tuple[int, int], float] = {}
        self.bus = MqttBus("127.0.0.1", run.mqtt_port, run.prefix)
        self.callers: list[_Counted] = []
        for device_id in sorted(run.keys):
            c = _Counted(device_id, run.keys[device_id], run.counters, self.bus.send)
            c.acked = self.acked
            self.callers.append(c)
        self.bus.callers.update({c.device_id: c for c in self.callers})
        self.sent = 0
        self._next = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> _Load:
        await self.bus.__aenter__()
        # One connection stands in for thousands of callers, each of which has
        # its own; paho's window of 20 unacknowledged publishes per connection
        # would otherwise cap the offered load, not the gateway.
        self.bus._client._client._max_inflight_messages = 1_000_000
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await self.bus.__aexit__(*exc)

    def _one(self) -> None:
        for _ in range(len(self.callers)):
            caller = self.callers[self._next]
            self._next = (self._next + 1) % len(self.callers)
            if not caller._press_lock.locked():  # a pressing caller sends no heartbeat
                break
        else:
            return
        self.sent += 1
        if self.press_every and self.sent % self.press_every == 0:
            coro: Any = caller.press(Key.CALL, give_up_s=60)
        else:
            coro = caller.heartbeat()
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stored(self) -> int:
        """Events committed so far, read beside the gateway (WAL lets readers in)."""
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.run.db}?mode=ro", uri=True)
        return int(self._db.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0)

    async def step(self, rate: float, seconds: float) -> dict[str, float]:
        run = self.run
        sent0, acked0 = self.sent, len(self.acked)
        stored0 = self._stored()
        gw0, br0, gen0 = run.cpu_seconds(), run.broker_cpu_seconds(), time.process_time()
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (now := loop.time()) < start + seconds:
            due = int((now - start) * rate) - (self.sent - sent0)
            for _ in range(due):
                self._one()
            await asyncio.sleep(TICK_S)
        window_end = time.monotonic()
        window_s = loop.time() - start
        window_start = window_end - window_s
        sent_in_window = self.sent - sent0
        stored_in_window = self._stored() - stored0
        # The rate counts ACKs inside the step; then the backlog is drained so
        # the next step starts clean, and its CPU is charged to this step.
        sent = self.sent - sent0
        deadline = time.monotonic() + DRAIN_S
        while len(self.acked) - acked0 < sent and time.monotonic() < deadline:  # noqa: ASYNC110 -- polls a count the callers fill
            await asyncio.sleep(0.05)
        acked = len(self.acked) - acked0
        in_window = sum(1 for t in list(self.acked.values())[acked0:] if t <= window_end)
        gw, br = run.cpu_seconds() - gw0, run.broker_cpu_seconds() - br0
        gen = time.process_time() - gen0
        per = 1e6 / max(acked, 1)
        return {
            "offered": rate,
            "sent_per_s": sent_in_window / window_s,
            "stored_per_s": stored_in_window / window_s,
            "acked_per_s": in_window / (window_end - window_start),
            "unacked": sent - acked,
            "gw_cpu_us": gw * per,
            "broker_cpu_us": br * per,
            "gen_cpu_us": gen * per,
        }


async def _daemon(run: Running, press_every: int | None, rates: tuple[int, ...],
                  step_s: float) -> list[dict[str, float]]:  # fmt: skip
    steps: list[dict[str, float]] = []
    async with _Load(run, press_every) as load:
        await load.step(100, 1.0)  # warm up: every path taken once
        best = 0.0
        for rate in rates:
            s = await load.step(rate, step_s)
            steps.append(s)
            print(f"  offered {rate:>6}/s  sent {s['sent_per_s']:6.0f}/s  "
                  f"stored {s['stored_per_s']:6.0f}/s  acked {s['acked_per_s']:6.0f}/s  "
                  f"gateway {s['gw_cpu_us']:6.0f} µs/event  broker {s['broker_cpu_us']:5.0f}  "
                  f"generator {s['gen_cpu_us']:5.0f}", flush=True)  # fmt: skip
            # Saturated: no longer keeping up, and no more than before.
            if s["acked_per_s"] < 0.9 * rate and s["acked_per_s"] < 1.05 * best:
                break
            best = max(best, s["acked_per_s"])
    return steps


def _summary(
    load: str, runs: list[list[dict[str, float]]], limits: list[float]
) -> dict[str, object]:
    def at_peak(r: list[dict[str, float]]) -> dict[str, float]:
        return max(r, key=lambda s: s["acked_per_s"])

    def lowest(r: list[dict[str, float]]) -> dict[str, float]:
        return r[0]

    sat = statistics.median(at_peak(r)["acked_per_s"] for r in runs)
    stored = statistics.median(max(s["stored_per_s"] for s in r) for r in runs)
    gw_us = statistics.median(at_peak(r)["gw_cpu_us"] for r in runs)
    limit = statistics.median(limits)
    return {
        "load": load,
        "acked_events_per_s": round(sat),
        "stored_events_per_s": round(stored),
        "sqlite_limit_events_per_s": round(limit),
        "ratio": round(sat / limit, 3),
        "gw_cpu_us_per_event_at_saturation": round(gw_us),
        # What the gateway would take with a core to itself, at that cost per event.
        "one_core_events_per_s": round(1e6 / gw_us),
        f"gw_cpu_us_per_event_at_{int(runs[0][0]['offered'])}_per_s": round(
            statistics.median(lowest(r)["gw_cpu_us"] for r in runs)
        ),
        "broker_cpu_us_per_event": round(
            statistics.median(at_peak(r)["broker_cpu_us"] for r in runs)
        ),
        "generator_cpu_us_per_event": round(
            statistics.median(at_peak(r)["gen_cpu_us"] for r in runs)
        ),
        "runs": len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--step-s", type=float, default=5.0)
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--press-every", type=int, default=20, help="mixed load: one press in N")
    parser.add_argument("--baseline-events", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="one run, 2 s steps, 1,000 callers")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.step_s, args.callers, args.baseline_events = 1, 2.0, 1000, 20_000
    rates = tuple(int(x) for x in args.rates.split(","))
    rows: list[dict[str, object]] = []
    steps_out: dict[str, list[list[dict[str, float]]]] = {}
    small: dict[str, int] = {}
    for name, press_every in (("heartbeats", None), ("mixed", args.press_every)):
        limits, runs = [], []
        for i in range(args.runs):
            limits.append(_baseline(args.baseline_events, press_every))
            print(f"{name} run {i + 1}: plain SQLite, {BATCH} per commit: "
                  f"{limits[-1]:,.0f} events/s", flush=True)  # fmt: skip
            if i == 0:
                # Smaller groups, for scale: one event per commit is fsync-bound.
                for batch in (1, 16):
                    n = min(args.baseline_events, 400 * batch + 2000)
                    small[f"{name}, {batch} per commit"] = round(_baseline(n, press_every, batch))
                    print(f"  {batch} per commit: {small[f'{name}, {batch} per commit']:,} "
                          "events/s", flush=True)  # fmt: skip
            with village(args.callers) as run:
                runs.append(asyncio.run(_daemon(run, press_every, rates, args.step_s)))
        steps_out[name] = runs
        rows.append(_summary(name if press_every is None else f"mixed, 1 press in {press_every}",
                             runs, limits))  # fmt: skip
    report(
        "intake",
        rows,
        {
            "what": "acknowledged durable events/s at saturation over MQTT, against plain "
            f"sqlite3 group commit ({BATCH} per transaction, WAL, synchronous=FULL) of the same "
            "rows; CPU µs per acknowledged event (user+sys) of the gateway, the broker and the "
            "load generator, which share the machine's cores",
            "callers": args.callers,
            "step_s": args.step_s,
            "sqlite_smaller_groups_events_per_s": small,
            "steps": steps_out,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
