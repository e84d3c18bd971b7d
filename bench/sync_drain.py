"""Drain time of an outbox backlog to the reference central store (SQLite).

    .venv/bin/python -m bench.sync_drain [--runs 3] [--records 100000] [--batch-sizes 500]

A village that was offline for days holds a backlog; this measures how long
it takes, once the link is back, until every record is committed at the
district and acknowledged back (both sides fsync: SQLite synchronous=FULL).
The gateway side is the real Syncer in this process; the central store and
mosquitto are subprocesses on loopback.  Each figure is the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.config import SyncConfig
from gateway.store import DeskWrites, Store
from gateway.sync import Syncer

from ._village import REPO, _find, free_port, report

VILLAGE = "bench"


def _case(case_id: str, device: int, step: int) -> dict[str, Any]:
    """About the size of a real case record (a few transitions and notifications)."""
    now = 1_760_000_000.0 + step
    return {
        "id": case_id,
        "device_id": device,
        "counter": step + 1,
        "opened_at": now,
        "state": ["opened", "notifying", "accepted", "on_site", "resolved"][step % 5],
        "grid": "grid-1",
        "urgent": False,
        "step": step,
        "round": 0,
        "current": "wang-shuji",
        "tried": ["wang-shuji", "li-fushuji"][: 1 + step % 2],
        "notified": ["wang-shuji"],
        "failed_channels": [],
        "accepted_by": "wang-shuji" if step % 5 >= 2 else None,
        "resolved_at": now + 600 if step % 5 == 4 else None,
        "rating": None,
        "ratings": [],
        "transitions": [
            {"at": now + i, "from": "opened", "to": "notifying", "by": "desk", "note": "call"}
            for i in range(1 + step % 5)
        ],
    }


async def _fill(store: Store, records: int) -> int:
    rows = []
    cases = max(1, records // 5)
    for i in range(records):
        c = i % cases
        case_id = f"{1_000_000 + c}-{i // cases + 1}"
        rows.append(("case", case_id, _case(case_id, 1_000_000 + c, i // cases)))
    size = 0
    for i in range(0, records, 5000):
        chunk = rows[i : i + 5000]
        await store.append([], desk=DeskWrites(outbox=chunk, at=time.time()))
    async with store._db.execute("SELECT AVG(LENGTH(payload)) FROM outbox") as cur:
        row = await cur.fetchone()
        size = int(row[0]) if row else 0
    return size


@contextlib.contextmanager
def _district(work: Path) -> Iterator[int]:
    """mosquitto and the central store, on a free port, for one run."""
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "max_queued_messages 100000\n"
    )
    log = work / "central.log"
    procs = [
        subprocess.Popen(
            [_find("mosquitto"), "-c", str(work / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "simulators.central_store", "--mqtt", f"127.0.0.1:{port}",
             "--db", f"sqlite:{work / 'central.db'}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        ))  # fmt: skip
        deadline = time.monotonic() + 30
        while b'"ready"' not in (log.read_bytes() if log.exists() else b""):
            if time.monotonic() > deadline or procs[1].poll() is not None:
                raise SystemExit(f"central store did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield port
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _drain(work: Path, port: int, records: int, batch_size: int) -> tuple[float, int]:
    store = await Store.open(work / "gateway.db")
    try:
        size = await _fill(store, records)
        syncer = Syncer(
            SyncConfig(
                host="127.0.0.1", port=port, batch_size=batch_size, batch_max_bytes=8 << 20,
                ack_timeout_s=30, poll_interval_s=0.05,
            ),
            village_id=VILLAGE, store=store, apply_config=_no_push,
        )  # fmt: skip
        start = time.perf_counter()
        task = asyncio.create_task(syncer.run())
        while await store.outbox_count():
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return elapsed, size
    finally:
        await store.close()


async def _no_push(version: int, files: dict[str, str]) -> list[str]:
    return ["not supported in the benchmark"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch-sizes", default="500")
    parser.add_argument("--quick", action="store_true", help="10,000 records, one run")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.records = 1, 10_000
    import logging

    import structlog

    # Only warnings: the drain logs a line per connection, not per batch, but keep it quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows: list[dict[str, object]] = []
    for batch_size in (int(x) for x in args.batch_sizes.split(",")):
        times: list[float] = []
        size = 0
        for i in range(args.runs):
            with (
                tempfile.TemporaryDirectory(prefix="onetouch-sync-bench-") as tmp,
                _district(Path(tmp)) as port,
            ):
                elapsed, size = asyncio.run(_drain(Path(tmp), port, args.records, batch_size))
            times.append(elapsed)
            print(f"run {i + 1}: batch {batch_size}: {elapsed:.2f} s", flush=True)
        median = statistics.median(times)
        rows.append({
            "records": args.records,
            "batch_size": batch_size,
            "record_bytes": size,
            "drain_s": round(median, 2),
            "records_per_s": round(args.records / median),
            "runs": args.runs,
        })  # fmt: skip
    report(
        "sync_drain",
        rows,
        {
            "what": "outbox backlog to the reference central store (SQLite), acknowledged back; "
            "synchronous=FULL on both sides; median of runs",
            "cpu_count": os.cpu_count(),
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
