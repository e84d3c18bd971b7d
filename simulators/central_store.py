"""The district's reference central case store (docs/sync.md).

    python -m simulators.central_store --mqtt HOST:PORT [--db sqlite:PATH | --dsn postgresql://...]
        [--group NAME] [--root district]                   consume the villages' streams
    python -m simulators.central_store [--db ...] list [--village V]
    python -m simulators.central_store [--db ...] figures [--village V]
    python -m simulators.central_store --mqtt HOST:PORT push-config --village V --version N FILES...

Several of these processes with the same ``--group`` share the villages'
streams through an MQTT 5 shared subscription.  A batch is acknowledged only
after its transaction has committed; records are keyed by (village, gateway
database, outbox id), so a batch seen twice is stored once and acknowledged
again.

Test hooks (environment), so tests can crash it at the worst moment:
``CENTRAL_STORE_EXIT_AFTER_COMMIT=N`` exits (as abruptly as ``kill -9``) right
after the N-th committed batch, before its acknowledgement goes out;
``CENTRAL_STORE_COMMIT_DELAY_S=S`` waits S seconds before each commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import ssl
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from gateway.sync_contract import Ack, Batch, ConfigPush, ConfigReport, Record, SyncTopics

__all__ = ["CentralDb", "main", "open_db"]

OPEN_STATES = frozenset({"opened", "notifying", "accepted", "on_site", "unanswered"})


def _log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, ensure_ascii=False), file=sys.stderr, flush=True)


def _newest_cases(records: Sequence[Record]) -> list[Record]:
    """The newest version of each case in a batch (highest outbox id)."""
    newest: dict[str, Record] = {}
    for r in records:
        if r.kind == "case" and r.case_id is not None:
            old = newest.get(r.case_id)
            if old is None or r.id > old.id:
                newest[r.case_id] = r
    return list(newest.values())


def _rating(payload: dict[str, Any]) -> str | None:
    rating = payload.get("rating")
    return rating.get("value") if isinstance(rating, dict) else None


class CentralDb(Protocol):
    async def commit_batch(self, batch: Batch) -> tuple[int, int]:
        """Store a batch in one transaction: (records new, records already known)."""
        ...

    async def save_report(self, report: ConfigReport) -> None: ...

    async def cases(self, village: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def figures(self, village: str | None) -> dict[str, Any]: ...

    async def close(self) -> None: ...


# --- SQLite ------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq          INTEGER PRIMARY KEY,  -- the order records were first stored
    village      TEXT    NOT NULL,
    store        TEXT    NOT NULL,
    outbox_id    INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    case_id      TEXT,
    created_at   REAL    NOT NULL,
    wall_trusted INTEGER NOT NULL,
    payload      TEXT    NOT NULL,
    received_at  REAL    NOT NULL,
    UNIQUE (village, store, outbox_id)
);
CREATE INDEX IF NOT EXISTS records_case ON records (village, case_id, seq);
CREATE TABLE IF NOT EXISTS cases (
    village    TEXT    NOT NULL,
    case_id    TEXT    NOT NULL,
    store      TEXT    NOT NULL,
    outbox_id  INTEGER NOT NULL,
    state      TEXT,
    rating     TEXT,
    opened_at  REAL,
    updated_at REAL    NOT NULL,
    data       TEXT    NOT NULL,
    PRIMARY KEY (village, case_id)
);
CREATE TABLE IF NOT EXISTS config_reports (
    village     TEXT    NOT NULL,
    push_id     TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    applied     INTEGER NOT NULL,
    problems    TEXT    NOT NULL,
    at          REAL    NOT NULL,
    PRIMARY KEY (village, push_id)
);
"""

_SQLITE_RECORD = (
    "INSERT INTO records (village, store, outbox_id, kind, case_id, created_at, wall_trusted, "
    "payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (village, store, outbox_id) DO NOTHING"
)
# Newest by outbox id wins, whatever order batches arrive in; a record from a
# different gateway database (a replaced SD card) is that gateway's newer life.
_SQLITE_CASE = (
    "INSERT INTO cases (village, case_id, store, outbox_id, state, rating, opened_at, "
    "updated_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (village, case_id) DO UPDATE SET store = excluded.store, "
    "outbox_id = excluded.outbox_id, state = excluded.state, rating = excluded.rating, "
    "opened_at = excluded.opened_at, updated_at = excluded.updated_at, data = excluded.data "
    "WHERE excluded.outbox_id > cases.outbox_id OR excluded.store <> cases.store"
)


class SqliteDb:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA busy_timeout=10000")
        # Several workers may open one new file at the same moment.  SQLite
        # answers "database is locked" at once, without its busy handler, to
        # whoever loses the race to switch the file to WAL or create the
        # schema, so the loser retries instead of exiting.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.executescript(_SQLITE_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # FULL: the acknowledgement promises the batch survives a power cut.
        self._con.execute("PRAGMA synchronous=FULL")
        self._lock = asyncio.Lock()

    async def _run(self, fn: Any, *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def commit_batch(self, batch: Batch) -> tuple[int, int]:
        return await self._run(self._commit, batch)  # type: ignore[no-any-return]

    def _commit(self, batch: Batch) -> tuple[int, int]:
        con, now = self._con, time.time()
        con.execute("BEGIN IMMEDIATE")
        try:
            before = con.total_changes
            con.executemany(
                _SQLITE_RECORD,
                [
                    (
                        batch.village,
                        batch.store,
                        r.id,
                        r.kind,
                        r.case_id,
                        r.created_at,
                        int(r.wall_trusted),
                        json.dumps(r.payload, ensure_ascii=False),
                        now,
                    )
                    for r in batch.records
                ],
            )
            new = con.total_changes - before
            con.executemany(
                _SQLITE_CASE,
                [
                    (
                        batch.village,
                        r.case_id,
                        batch.store,
                        r.id,
                        r.payload.get("state"),
                        _rating(r.payload),
                        r.payload.get("opened_at"),
                        r.created_at,
                        json.dumps(r.payload, ensure_ascii=False),
                    )
                    for r in _newest_cases(batch.records)
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return new, len(batch.records) - new

    async def save_report(self, report: ConfigReport) -> None:
        def save() -> None:
            self._con.execute(
                "INSERT OR REPLACE INTO config_reports VALUES (?, ?, ?, ?, ?, ?)",
                (
                    report.village,
                    report.push_id,
                    report.version,
                    int(report.applied),
                    json.dumps(report.problems, ensure_ascii=False),
                    report.at,
                ),
            )

        await self._run(save)

    async def cases(self, village: str | None, limit: int) -> list[dict[str, Any]]:
        def query() -> list[dict[str, Any]]:
            sql = "SELECT village, case_id, state, rating, opened_at, updated_at FROM cases"
            args: tuple[Any, ...] = ()
            if village:
                sql, args = sql + " WHERE village = ?", (village,)
            rows = self._con.execute(sql + " ORDER BY updated_at DESC LIMIT ?", (*args, limit))
            cols = ("village", "case_id", "state", "rating", "opened_at", "updated_at")
            return [dict(zip(cols, r, strict=True)) for r in rows]

        return await self._run(query)  # type: ignore[no-any-return]

    async def figures(self, village: str | None) -> dict[str, Any]:
        def query() -> tuple[list[Any], list[Any], int]:
            where, args = ("WHERE village = ?", (village,)) if village else ("", ())
            states = self._con.execute(
                f"SELECT state, COUNT(*) FROM cases {where} GROUP BY state", args
            ).fetchall()
            ratings = self._con.execute(
                f"SELECT rating, COUNT(*) FROM cases {where} {'AND' if where else 'WHERE'} "
                "rating IS NOT NULL GROUP BY rating",
                args,
            ).fetchall()
            records = self._con.execute(f"SELECT COUNT(*) FROM records {where}", args).fetchone()
            return states, ratings, int(records[0])

        states, ratings, records = await self._run(query)
        return _figures(states, ratings, records)

    async def close(self) -> None:
        self._con.close()


def _figures(states: list[Any], ratings: list[Any], records: int) -> dict[str, Any]:
    by_state = {str(s): int(n) for s, n in states}
    by_rating = {str(r): int(n) for r, n in ratings}
    rated = sum(by_rating.values())
    return {
        "records": records,
        "cases": sum(by_state.values()),
        "open": sum(n for s, n in by_state.items() if s in OPEN_STATES),
        "by_state": by_state,
        "rated": rated,
        "satisfied": by_rating.get("up", 0),
        "satisfaction": round(by_rating.get("up", 0) / rated, 4) if rated else None,
    }


# --- PostgreSQL ----------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    village      TEXT             NOT NULL,
    store        TEXT             NOT NULL,
    outbox_id    BIGINT           NOT NULL,
    kind         TEXT             NOT NULL,
    case_id      TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    wall_trusted BOOLEAN          NOT NULL,
    payload      JSONB            NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    UNIQUE (village, store, outbox_id)
);
CREATE INDEX IF NOT EXISTS records_case ON records (village, case_id, seq);
CREATE TABLE IF NOT EXISTS cases (
    village    TEXT             NOT NULL,
    case_id    TEXT             NOT NULL,
    store      TEXT             NOT NULL,
    outbox_id  BIGINT           NOT NULL,
    state      TEXT,
    rating     TEXT,
    opened_at  DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
    data       JSONB            NOT NULL,
    PRIMARY KEY (village, case_id)
);
CREATE TABLE IF NOT EXISTS config_reports (
    village  TEXT             NOT NULL,
    push_id  TEXT             NOT NULL,
    version  BIGINT           NOT NULL,
    applied  BOOLEAN          NOT NULL,
    problems JSONB            NOT NULL,
    at       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (village, push_id)
);
"""

# One statement per table per batch (unnest), in the batch's order, so a
# 500-record batch costs two round trips, not five hundred.
_PG_RECORDS = """
INSERT INTO records (village, store, outbox_id, kind, case_id, created_at, wall_trusted,
                     payload, received_at)
SELECT $1, $2, r.outbox_id, r.kind, r.case_id, r.created_at, r.wall_trusted, r.payload::jsonb, $3
FROM unnest($4::bigint[], $5::text[], $6::text[], $7::float8[], $8::bool[], $9::text[])
     WITH ORDINALITY AS r(outbox_id, kind, case_id, created_at, wall_trusted, payload, ord)
ORDER BY r.ord
ON CONFLICT (village, store, outbox_id) DO NOTHING
RETURNING outbox_id
"""
_PG_CASES = """
INSERT INTO cases (village, case_id, store, outbox_id, state, rating, opened_at, updated_at, data)
SELECT $1, c.case_id, $2, c.outbox_id, c.state, c.rating, c.opened_at, c.updated_at,
       c.data::jsonb
FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::float8[], $8::float8[],
            $9::text[]) AS c(case_id, outbox_id, state, rating, opened_at, updated_at, data)
ON CONFLICT (village, case_id) DO UPDATE SET store = excluded.store,
    outbox_id = excluded.outbox_id, state = excluded.state, rating = excluded.rating,
    opened_at = excluded.opened_at, updated_at = excluded.updated_at, data = excluded.data
WHERE excluded.outbox_id > cases.outbox_id OR excluded.store <> cases.store
"""


class PostgresDb:
    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> PostgresDb:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        # Several workers may start at once; the lock makes CREATE IF NOT EXISTS safe.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(4242)")
            await conn.execute(_PG_SCHEMA)
        return cls(conn)

    async def commit_batch(self, batch: Batch) -> tuple[int, int]:
        recs = batch.records
        payloads = [json.dumps(r.payload, ensure_ascii=False) for r in recs]
        newest = _newest_cases(recs)
        async with self._lock, self._conn.transaction():
            inserted = await self._conn.fetch(
                _PG_RECORDS,
                batch.village,
                batch.store,
                time.time(),
                [r.id for r in recs],
                [r.kind for r in recs],
                [r.case_id for r in recs],
                [r.created_at for r in recs],
                [r.wall_trusted for r in recs],
                payloads,
            )
            if newest:
                await self._conn.execute(
                    _PG_CASES,
                    batch.village,
                    batch.store,
                    [r.case_id for r in newest],
                    [r.id for r in newest],
                    [r.payload.get("state") for r in newest],
                    [_rating(r.payload) for r in newest],
                    [r.payload.get("opened_at") for r in newest],
                    [r.created_at for r in newest],
                    [json.dumps(r.payload, ensure_ascii=False) for r in newest],
                )
        return len(inserted), len(recs) - len(inserted)

    async def save_report(self, report: ConfigReport) -> None:
        async with self._lock:
            await self._conn.execute(
                "INSERT INTO config_reports VALUES ($1, $2, $3, $4, $5::jsonb, $6) "
                "ON CONFLICT (village, push_id) DO UPDATE SET applied = excluded.applied, "
                "problems = excluded.problems, at = excluded.at",
                report.village,
                report.push_id,
                report.version,
                report.applied,
                json.dumps(report.problems, ensure_ascii=False),
                report.at,
            )

    async def cases(self, village: str | None, limit: int) -> list[dict[str, Any]]:
        async with self._lock:
            rows = await self._conn.fetch(
                "SELECT village, case_id, state, rating, opened_at, updated_at FROM cases "
                "WHERE $1::text IS NULL OR village = $1 ORDER BY updated_at DESC LIMIT $2",
                village,
                limit,
            )
        return [dict(r) for r in rows]

    async def figures(self, village: str | None) -> dict[str, Any]:
        async with self._lock:
            states = await self._conn.fetch(
                "SELECT state, COUNT(*) FROM cases WHERE $1::text IS NULL OR village = $1 "
                "GROUP BY state",
                village,
            )
            ratings = await self._conn.fetch(
                "SELECT rating, COUNT(*) FROM cases WHERE ($1::text IS NULL OR village = $1) "
                "AND rating IS NOT NULL GROUP BY rating",
                village,
            )
            records = await self._conn.fetchval(
                "SELECT COUNT(*) FROM records WHERE $1::text IS NULL OR village = $1", village
            )
        return _figures([tuple(r) for r in states], [tuple(r) for r in ratings], int(records))

    async def close(self) -> None:
        await self._conn.close()


async def open_db(db: str, dsn: str | None) -> CentralDb:
    if dsn:
        return await PostgresDb.connect(dsn)
    if not db.startswith("sqlite:"):
        raise SystemExit(f"--db {db!r}: expected sqlite:PATH (or use --dsn postgresql://...)")
    return SqliteDb(Path(db.removeprefix("sqlite:")))


# --- MQTT ----------------------------------------------------------------------


def _client(args: argparse.Namespace, identifier: str) -> aiomqtt.Client:
    host, _, port = args.mqtt.rpartition(":")
    tls = ssl.create_default_context(cafile=args.ca_file) if args.tls else None
    return aiomqtt.Client(
        host or "127.0.0.1",
        int(port),
        identifier=identifier,
        username=args.username,
        password=args.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        # No persistent session: when the store is down, the gateways keep
        # their records and send them again; the broker need not hoard them.
        clean_start=True,
        tls_context=tls,
        # Nagle's algorithm holds a small ack back until the previous segment is
        # acknowledged: ~40 ms per batch with delayed ACKs.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        timeout=10,
    )


class Consumer:
    def __init__(self, db: CentralDb, root: str) -> None:
        self.db = db
        self.root = root
        self.committed = 0
        self.exit_after = int(os.environ.get("CENTRAL_STORE_EXIT_AFTER_COMMIT", "0") or 0)
        self.delay = float(os.environ.get("CENTRAL_STORE_COMMIT_DELAY_S", "0") or 0)

    async def handle(self, client: aiomqtt.Client, message: Any) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        if topic.endswith("/sync/batch"):
            await self._batch(client, message, topic, bytes(payload))
        elif topic.endswith("/config/report"):
            try:
                report = ConfigReport.model_validate_json(payload)
            except ValidationError as exc:
                _log("bad config report", topic=topic, error=str(exc))
                return
            await self.db.save_report(report)
            _log(
                "config report",
                village=report.village,
                version=report.version,
                applied=report.applied,
                problems=report.problems,
            )

    async def _batch(self, client: aiomqtt.Client, message: Any, topic: str, raw: bytes) -> None:
        try:
            batch = Batch.model_validate_json(raw)
        except ValidationError as exc:
            # Not acknowledged: the records stay in the village's outbox (and
            # its backlog alarm goes off) until a store that understands them runs.
            _log("batch rejected", topic=topic, error=str(exc)[:2000])
            return
        _log("batch received", village=batch.village, batch=batch.batch)
        if self.delay:
            await asyncio.sleep(self.delay)
        new, dup = await self.db.commit_batch(batch)
        self.committed += 1
        if self.exit_after and self.committed >= self.exit_after:
            _log("test hook: exiting after commit, before the acknowledgement", batch=batch.batch)
            os._exit(3)
        props = message.properties
        reply = getattr(props, "ResponseTopic", None) or topic.removesuffix("/batch") + "/ack"
        out = Properties(PacketTypes.PUBLISH)
        correlation = getattr(props, "CorrelationData", None)
        if correlation:
            out.CorrelationData = correlation
        ack = Ack(
            village=batch.village,
            store=batch.store,
            batch=batch.batch,
            ids=[r.id for r in batch.records],
            committed_at=time.time(),
        )
        await client.publish(reply, ack.model_dump_json().encode(), qos=1, properties=out)
        _log("batch committed", village=batch.village, batch=batch.batch, new=new, duplicates=dup)


async def serve(args: argparse.Namespace) -> int:
    db = await open_db(args.db, args.dsn)
    consumer = Consumer(db, args.root)
    delay = 0.2
    try:
        while True:
            try:
                async with _client(args, f"central-{args.group}-{uuid.uuid4().hex[:8]}") as client:
                    for topic_filter in SyncTopics.shared(args.group, args.root):
                        await client.subscribe(topic_filter, qos=1)
                    _log("ready", mqtt=args.mqtt, group=args.group, root=args.root, pid=os.getpid())
                    delay = 0.2
                    async for message in client.messages:
                        await consumer.handle(client, message)
            except aiomqtt.MqttError as exc:
                _log("broker unreachable; reconnecting", error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    finally:
        await db.close()


async def list_cases(args: argparse.Namespace) -> int:
    db = await open_db(args.db, args.dsn)
    try:
        rows = await db.cases(args.village, args.limit)
    finally:
        await db.close()
    print(f"{'village':<16} {'case':<28} {'state':<11} {'rating':<6} updated")
    for r in rows:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"]))
        print(
            f"{r['village']:<16} {r['case_id']:<28} {r['state'] or '-':<11} "
            f"{r['rating'] or '-':<6} {updated}"
        )
    return 0


async def figures(args: argparse.Namespace) -> int:
    db = await open_db(args.db, args.dsn)
    try:
        f = await db.figures(args.village)
    finally:
        await db.close()
    print(json.dumps(f, indent=2, ensure_ascii=False) if args.json else _figures_text(f))
    return 0


def _figures_text(f: dict[str, Any]) -> str:
    lines = [f"records {f['records']}, cases {f['cases']}, open {f['open']}"]
    lines += [f"  {state:<11} {n}" for state, n in sorted(f["by_state"].items())]
    sat = "n/a" if f["satisfaction"] is None else f"{f['satisfaction'] * 100:.1f}%"
    lines.append(f"satisfaction {sat} ({f['satisfied']} of {f['rated']} rated cases)")
    return "\n".join(lines)


def _read_files(names: list[str]) -> dict[str, str] | None:
    files: dict[str, str] = {}
    for name in names:
        path = Path(name)
        try:
            files[path.name] = path.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"{path}: {exc.strerror}", file=sys.stderr)
            return None
    return files


async def push_config(args: argparse.Namespace) -> int:
    files = _read_files(args.files)  # small files, read before anything is sent
    if files is None:
        return 2
    try:
        push = ConfigPush(
            village=args.village,
            version=args.version,
            push_id=uuid.uuid4().hex,
            files=files,
            sent_at=time.time(),
        )
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            print(f"push: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    topics = SyncTopics(args.prefix or f"{args.root}/{args.village}")
    async with _client(args, f"central-push-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topics.config_report, qos=1)
        await client.publish(topics.config_push, push.model_dump_json().encode(), qos=1)
        print(f"pushed version {args.version} to {args.village}: {', '.join(sorted(files))}")
        try:
            async with asyncio.timeout(args.timeout):
                async for message in client.messages:
                    with contextlib.suppress(ValidationError):
                        report = ConfigReport.model_validate_json(message.payload)  # type: ignore[arg-type]
                        if report.push_id == push.push_id:
                            break
        except TimeoutError:
            print(
                f"no report within {args.timeout:g} s; the push waits in the gateway's "
                "session at the broker, and the report will reach the central store",
                file=sys.stderr,
            )
            return 3
    if report.applied:
        print(f"applied: village {report.village} now runs version {report.version}")
        return 0
    kept = (
        "the configuration it had"
        if report.applied_version is None
        else f"version {report.applied_version}"
    )
    print(f"rejected: village {report.village} keeps {kept}; {len(report.problems)} problem(s):")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.central_store",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--mqtt", default="127.0.0.1:1883", help="the district broker HOST:PORT")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca-file")
    p.add_argument("--db", default="sqlite:central.db", help="sqlite:PATH (default)")
    p.add_argument("--dsn", help="postgresql://... (instead of --db)")
    p.add_argument("--group", default="central", help="shared subscription group")
    p.add_argument("--root", default="district", help="topic root; villages are ROOT/VILLAGE")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="consume the villages' streams (the default)")
    ls = sub.add_parser("list", help="cases and their state, newest first")
    ls.add_argument("--village")
    ls.add_argument("--limit", type=int, default=50)
    fg = sub.add_parser("figures", help="counts per state and satisfaction")
    fg.add_argument("--village")
    fg.add_argument("--json", action="store_true")
    pc = sub.add_parser("push-config", help="push people/roster/residents files to a village")
    pc.add_argument("--village", required=True)
    pc.add_argument("--version", type=int, required=True)
    pc.add_argument("--prefix", help="the village's topic prefix (default ROOT/VILLAGE)")
    pc.add_argument("--timeout", type=float, default=30.0)
    pc.add_argument("files", nargs="+", help="people.toml, roster.toml and/or residents.toml")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {
        None: serve,
        "serve": serve,
        "list": list_cases,
        "figures": figures,
        "push-config": push_config,
    }[args.command]
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
