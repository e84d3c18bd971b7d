"""Start-up: from the daemon's exec to READY=1 with a 100,000-record database.

    .venv/bin/python -m bench.startup [--runs 3] [--records 100000] [--callers 10000]
    .venv/bin/python -m bench.startup --quick           # under a minute

The database is seeded once through the gateway's own code: green presses
from distinct callers go through the real call desk, whose decisions (cases,
district records, desk events) are written with the press in one
transaction, as the intake does; the cases span ``--days`` up to now, and
all but one in a hundred are accepted, reached and resolved within minutes,
again through the desk.  (``--days 1`` puts every case inside the rating
window, which the daemon loads whole at start: a worst case.)  Heartbeats fill the
journal up to ``--records`` rows across events, cases and the outbox.  Every
run starts the daemon on a fresh copy, with NOTIFY_SOCKET pointing at a Unix
datagram socket this process binds, the way systemd does, and times from just
before exec to the READY=1 datagram.  The daemon restores the open cases and
each caller's last contact and high-water counters before it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from firmware_protocol import Key
from gateway.config import load
from gateway.desk import Desk, PersistCase, RecordForDistrict
from gateway.events import HeartbeatReceived, KeyPressed, PersonAnswered
from gateway.store import DeskWrites, Store

from ._village import report, village

CHUNK = 2000


async def _seed(
    config: Path, db_path: Path, records: int, callers: list[int], days: float
) -> dict[str, int]:
    loaded = load(config)
    desk = Desk(loaded.village)
    store = await Store.open(db_path)
    now = time.time()
    cases_wanted = max(1, records // 10)
    presses = callers[: min(len(callers), cases_wanted)]
    try:
        # Presses first: each opens a case.
        opened: list[tuple[str, str | None]] = []
        for first in range(0, len(presses), CHUNK):
            rows, writes = [], DeskWrites(at=now)
            cases = {}
            for device_id in presses[first : first + CHUNK]:
                # Spread over the last ``days``, oldest first, as a journal fills.
                at = now - days * 86400 * (1 - (first + len(rows)) / len(presses))
                event = KeyPressed(device_id, 1, "mqtt", at, True, Key.CALL)
                rows.append((event, hashlib.sha256(b"%d" % device_id).digest()[:8]))
                for action in desk.handle(event, at):
                    if isinstance(action, PersistCase):
                        cases[action.case.id] = action.case
                    elif isinstance(action, RecordForDistrict):
                        writes.outbox.append(("case", action.payload.get("id"), action.payload))
            writes.cases = list(cases.values())
            opened += [(c.id, c.current, c.opened_at) for c in writes.cases]
            await store.append(rows, desk=writes)
        # All but one in a hundred are accepted and resolved within minutes.
        answered = [c for i, c in enumerate(opened) if i % 100 and c[1] is not None]
        for first in range(0, len(answered), CHUNK):
            writes = DeskWrites(at=now)
            cases = {}
            for case_id, person, opened_at in answered[first : first + CHUNK]:
                assert person is not None
                for step, answer in enumerate(("accept", "arrived", "resolved"), 1):
                    at = opened_at + 300 * step
                    event = PersonAnswered(person, case_id, answer, "", at)
                    writes.desk_events.append(("answer", case_id, {"answer": answer}))
                    for action in desk.handle(event, at):
                        if isinstance(action, PersistCase):
                            cases[action.case.id] = action.case
                        elif isinstance(action, RecordForDistrict):
                            payload = action.payload
                            cid = (
                                payload.get("id")
                                if action.kind == "case"
                                else payload.get("case_id")
                            )
                            writes.outbox.append((action.kind, cid, payload))
            writes.cases = list(cases.values())
            await store.append([], desk=writes)
        counts = await _counts(store)
        # Heartbeats up to the number of records asked for.
        missing = records - counts["events"] - counts["cases"] - counts["outbox"]
        counter = 2
        while missing > 0:
            rows = []
            for i in range(min(missing, CHUNK * 5)):
                device_id = callers[i % len(callers)]
                event = HeartbeatReceived(device_id, counter + i // len(callers), "mqtt",
                                          now + 1, True, 3000, 87, -71, False, False)  # fmt: skip
                rows.append((event, b"\0" * 8))
            counter += len(rows) // len(callers) + 1
            await store.append(rows)
            missing -= len(rows)
        return await _counts(store)
    finally:
        await store.close()


async def _counts(store: Store) -> dict[str, int]:
    out = {}
    for table in ("events", "cases", "outbox", "desk_events"):
        async with store._db.execute(f"SELECT COUNT(*) FROM {table}") as cur:
            row = await cur.fetchone()
        out[table] = int(row[0]) if row else 0
    async with store._db.execute("SELECT COUNT(*) FROM cases WHERE open = 1") as cur:
        row = await cur.fetchone()
    out["open_cases"] = int(row[0]) if row else 0
    return out


def _copy(seed_db: Path, work: Path) -> None:
    shutil.copy(seed_db, work / "gateway.db")


def _one_start(seed_db: Path | None, callers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="onetouch-notify-") as tmp:
        path = Path(tmp) / "notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(60)
        try:
            with village(
                callers,
                prepare=None if seed_db is None else lambda w: _copy(seed_db, w),
                env={"NOTIFY_SOCKET": str(path)},
            ) as run:
                # The village helper waits for the broker to see the daemon
                # online; READY=1 was sent before that, and is queued here.
                while True:
                    data = sock.recv(65536)
                    at = time.monotonic()
                    if b"READY=1" in data.split(b"\n"):
                        break
                return at - run.started_at
        finally:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument(
        "--days", type=float, default=90, help="the cases span this many days up to now"
    )
    parser.add_argument("--name", default="startup", help="results file name")
    parser.add_argument("--quick", action="store_true", help="one run")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="onetouch-startup-") as tmp:
        seed = Path(tmp) / "seed.db"
        # A village is started once to get a configuration with these callers.
        with village(args.callers) as run:
            config_dir = Path(tmp) / "config"
            shutil.copytree(run.workdir, config_dir, ignore=shutil.ignore_patterns("tty*", "*.db*"))
            callers = sorted(run.keys)
        built = time.perf_counter()
        counts = asyncio.run(
            _seed(config_dir / "gateway.toml", seed, args.records, callers, args.days)
        )
        print(f"seeded {counts} in {time.perf_counter() - built:.1f} s", flush=True)
        full: list[float] = []
        empty: list[float] = []
        for i in range(args.runs):
            full.append(_one_start(seed, args.callers))
            empty.append(_one_start(None, args.callers))
            print(f"run {i + 1}: READY after {full[-1]:.2f} s ({empty[-1]:.2f} s with no "
                  "database)", flush=True)  # fmt: skip
        total = counts["events"] + counts["cases"] + counts["outbox"]
        rows.append({
            "records": total,
            "events": counts["events"],
            "cases": counts["cases"],
            "open_cases": counts["open_cases"],
            "days": args.days,
            "outbox": counts["outbox"],
            "callers": args.callers,
            "db_mb": round(seed.stat().st_size / 2**20, 1),
            "ready_s": round(statistics.median(full), 2),
            "ready_s_empty_db": round(statistics.median(empty), 2),
            "runs": args.runs,
        })  # fmt: skip
    what = {"what": "exec to READY=1 (sd_notify), seconds; median of runs"}
    report(args.name, rows, what, quick=args.quick)


if __name__ == "__main__":
    main()
