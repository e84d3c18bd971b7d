"""Press to acknowledgement: from the first byte a caller sends to the gateway's
ACK arriving back, through the real daemon, over MQTT and over the serial bus.

    .venv/bin/python -m bench.press_latency [--runs 3] [--callers 100,1000,10000]

The acknowledgement is sent only after the press is committed to SQLite
(synchronous=FULL), so every figure includes an fsync.  Each figure is the
median over runs of that run's median or 99th percentile.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from simulators.caller import MqttBus, SerialBus, SimCaller

from ._village import STEADY_RATE, Running, pct, press_green, report, village

STEADY_PRESSES = 300
BURST = 200


async def _measure(run: Running, transport: str, mode: str, seed: int) -> list[float]:
    rng = random.Random(seed)
    count = STEADY_PRESSES if mode == "steady" else BURST
    # Distinct callers where there are enough; otherwise some press twice, and a
    # caller's second press waits for its first (one press in flight, SPEC.md).
    population = sorted(run.keys)
    ids = rng.sample(population, min(count, len(population)))
    # One set of counters per village: a caller that forgot its counters would
    # be refused as a replay, as a real one would.
    counters = run.counters
    bus: MqttBus | SerialBus
    if transport == "mqtt":
        bus = MqttBus("127.0.0.1", run.mqtt_port, run.prefix)
    else:
        bus = SerialBus(str(run.bus_tty), 115200)
    by_id = {d: SimCaller(d, run.keys[d], counters, bus.send) for d in ids}
    bus.callers.update(by_id)
    callers = [by_id[ids[i % len(ids)]] for i in range(count)]
    async with bus:
        results = await press_green(callers, mode)
    missing = [r for r in results if not r.acked]
    if missing:
        raise SystemExit(f"{len(missing)} presses not acknowledged ({transport} {mode})")
    return [r.latency_s * 1000 for r in results]


async def _bench(run: Running, runs: int, callers: int) -> list[dict[str, object]]:
    rows = []
    for transport in ("mqtt", "serial"):
        for mode in ("steady", "burst"):
            medians, p99s = [], []
            for i in range(runs):
                lat = await _measure(run, transport, mode, seed=i * 7919 + callers)
                medians.append(statistics.median(lat))
                p99s.append(pct(lat, 0.99))
            rows.append(
                {
                    "callers": callers,
                    "transport": transport,
                    "load": f"{STEADY_RATE:.0f}/s steady"
                    if mode == "steady"
                    else f"{BURST} at once",
                    "median_ms": round(statistics.median(medians), 2),
                    "p99_ms": round(statistics.median(p99s), 2),
                    "runs": runs,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", default="100,1000,10000")
    parser.add_argument("--quick", action="store_true", help="1,000 callers, one run")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.callers = 1, "1000"
    rows: list[dict[str, object]] = []
    for n in (int(x) for x in args.callers.split(",")):
        with village(n) as run:
            rows += asyncio.run(_bench(run, args.runs, n))
    what = {"what": "press to ACK, ms; ACK follows the fsync"}
    report("press_latency", rows, what, quick=args.quick)


if __name__ == "__main__":
    main()
