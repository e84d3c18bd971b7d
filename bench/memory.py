"""Resident memory of the daemon with 10,000 registered callers: idle, under
load, and its slope over a soak.

    .venv/bin/python -m bench.memory [--runs 3] [--callers 10000] [--soak-s 3600]
    .venv/bin/python -m bench.memory --quick            # under a minute, no soak

Idle: RSS (VmRSS) once the daemon is ready and has been left alone a few
seconds.  Under load: the highest RSS sampled while the callers send
``--load-rate`` events a second (heartbeats, one green press in 20) for
``--load-s`` seconds: long enough by default for every caller to be heard
sixteen times, so that what the gateway keeps per caller has reached its
steady size.  Soak: one daemon for ``--soak-s`` seconds under a
village's load (``--soak-rate`` heartbeats a second from every caller in
turn, one press in 200), while the secretary app simulator accepts, arrives
at and resolves every call, so cases open and close as in a village; RSS is
sampled every ``--every`` seconds and the least-squares slope is given in MB
per hour.  Every idle and load figure is the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from ._village import REPO, Running, report, village
from .intake import _Load

# Set by SIGINT or SIGTERM: the soak ends early and reports the time it did run.
_stop: list[int] = []


def _stop_soak(signum: int, _frame: object) -> None:
    _stop.append(signum)


def _slope_mb_per_h(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    if n < 2:
        return float("nan")
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (r - mr) for t, r in samples) / den * 3600 if den else float("nan")


async def _under_load(run: Running, rate: float, seconds: float) -> float:
    peak = 0.0
    async with _Load(run, 20) as load:
        task = asyncio.create_task(load.step(rate, seconds))
        while not task.done():
            peak = max(peak, run.rss_mb())
            await asyncio.sleep(0.25)
        await task
    return max(peak, run.rss_mb())


def _app(run: Running) -> subprocess.Popen[bytes]:
    """Every secretary answers every call within seconds."""
    return subprocess.Popen(
        [sys.executable, "-m", "simulators.app", "--config", str(run.workdir / "gateway.toml"),
         "--mqtt", f"127.0.0.1:{run.mqtt_port}", "--default", "accept:1,arrived:2,resolved:3"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def _soak(run: Running, rate: float, seconds: float, every: float) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    app = _app(run)
    try:
        async with _Load(run, 200) as load:
            start = time.monotonic()
            cpu0 = run.cpu_seconds()
            sent0 = load.sent
            while (elapsed := time.monotonic() - start) < seconds and not _stop:
                await load.step(rate, min(every, seconds - elapsed))
                samples.append((time.monotonic() - start, run.rss_mb()))
                if len(samples) % max(1, int(300 / every)) == 0:
                    print(
                        f"  soak {samples[-1][0]:6.0f} s: RSS {samples[-1][1]:.1f} MB", flush=True
                    )
            cpu = run.cpu_seconds() - cpu0
            events = load.sent - sent0
    finally:
        app.terminate()
        app.wait(10)
    rss = [r for _, r in samples]
    return {
        "soak_s": round(samples[-1][0]) if samples else 0,
        "samples": len(samples),
        "rss_first_mb": round(rss[0], 1),
        "rss_last_mb": round(rss[-1], 1),
        "rss_max_mb": round(max(rss), 1),
        "slope_mb_per_h": round(_slope_mb_per_h(samples), 2),
        # The first minutes fill what the gateway keeps per caller; a leak shows
        # as a slope that stays once that is done.
        "slope_second_half_mb_per_h": round(_slope_mb_per_h(samples[len(samples) // 2 :]), 2),
        "events": events,
        "gw_cpu_share": round(cpu / samples[-1][0], 3),
        "series": [(round(t, 1), round(r, 2)) for t, r in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--callers", type=int, default=10_000)
    # 160 s at 1,000/s: every one of 10,000 callers is heard sixteen times, so
    # each caller's state in the gateway has grown to what it keeps for good.
    parser.add_argument("--load-rate", type=float, default=1000)
    parser.add_argument("--load-s", type=float, default=160)
    parser.add_argument("--soak-s", type=float, default=3600)
    parser.add_argument("--soak-rate", type=float, default=200)
    parser.add_argument("--every", type=float, default=10)
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--name", default="memory", help="results file name")
    parser.add_argument("--quick", action="store_true", help="one run, 10 s of load, no soak")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.load_s, args.no_soak = 1, 10, True
    idle, loaded = [], []
    for i in range(args.runs):
        with village(args.callers) as run:
            time.sleep(3)
            idle.append(run.rss_mb())
            loaded.append(asyncio.run(_under_load(run, args.load_rate, args.load_s)))
        print(f"run {i + 1}: idle {idle[-1]:.1f} MB, under load {loaded[-1]:.1f} MB", flush=True)
    row: dict[str, object] = {
        "callers": args.callers,
        "idle_rss_mb": round(statistics.median(idle), 1),
        "load_rss_mb": round(statistics.median(loaded), 1),
        "load": f"{args.load_rate:.0f} events/s for {args.load_s:.0f} s",
        "runs": args.runs,
    }
    extra: dict[str, object] = {"what": "VmRSS of the daemon, MB (2^20 bytes)"}
    if not args.no_soak:
        print(f"soak: {args.soak_s:.0f} s at {args.soak_rate:.0f} events/s", flush=True)
        signal.signal(signal.SIGINT, _stop_soak)
        signal.signal(signal.SIGTERM, _stop_soak)
        with village(args.callers) as run:
            soak = asyncio.run(_soak(run, args.soak_rate, args.soak_s, args.every))
        extra["soak_series"] = soak.pop("series")
        row.update(soak)
    report(args.name, [row], extra, quick=args.quick)


if __name__ == "__main__":
    main()
