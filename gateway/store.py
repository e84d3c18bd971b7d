"""The gateway's SQLite store: schema, migrations and the caller journal.

WAL with ``synchronous=FULL``: a row is on disk when ``commit`` returns, which
is what lets the intake acknowledge a press only after it is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from firmware_protocol import Key

from .desk import Case, Notice, case_from_dict, case_to_dict, notice_from_dict, notice_to_dict
from .events import CallerEvent, HeartbeatReceived, KeyPressed

__all__ = [
    "SCHEMA_VERSION",
    "DeskState",
    "DeskWrites",
    "JournalRow",
    "OutboxRow",
    "OutboxStats",
    "Store",
    "StoreError",
]

# Each entry moves the schema from version i to i + 1.  Never edit a released
# entry: add a new one, so a gateway in the field upgrades in place.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        id             INTEGER PRIMARY KEY,
        device_id      INTEGER NOT NULL,
        counter        INTEGER NOT NULL,
        kind           TEXT    NOT NULL CHECK (kind IN ('key', 'heartbeat')),
        key            INTEGER,
        battery_mv     INTEGER,
        battery_pct    INTEGER,
        signal_dbm     INTEGER,
        external_power INTEGER,
        low_battery    INTEGER,
        link           TEXT    NOT NULL,
        received_at    REAL    NOT NULL,
        wall_trusted   INTEGER NOT NULL,
        mac            BLOB    NOT NULL,
        UNIQUE (device_id, counter)
    );
    CREATE TABLE downlink_counters (
        device_id INTEGER PRIMARY KEY,
        reserved  INTEGER NOT NULL
    );
    """,
    # 2: the call desk.  A case is stored whole as JSON (its transitions,
    # ratings and pending deadline) with the columns that queries need.
    """
    CREATE TABLE cases (
        id          TEXT    PRIMARY KEY,
        device_id   INTEGER NOT NULL,
        state       TEXT    NOT NULL,
        open        INTEGER NOT NULL,
        opened_at   REAL    NOT NULL,
        updated_at  REAL    NOT NULL,
        resolved_at REAL,
        data        TEXT    NOT NULL
    );
    CREATE INDEX cases_open ON cases (open, device_id);
    CREATE INDEX cases_resolved ON cases (device_id, resolved_at);
    CREATE TABLE notices (
        device_id INTEGER NOT NULL,
        kind      TEXT    NOT NULL,
        data      TEXT    NOT NULL,
        PRIMARY KEY (device_id, kind)
    );
    -- Events that did not come from a caller: answers, deadlines, channel failures.
    CREATE TABLE desk_events (
        id           INTEGER PRIMARY KEY,
        at           REAL    NOT NULL,
        wall_trusted INTEGER NOT NULL,
        kind         TEXT    NOT NULL,
        case_id      TEXT,
        data         TEXT    NOT NULL
    );
    -- Records for the district's case store, in the order they were made.
    CREATE TABLE outbox (
        id           INTEGER PRIMARY KEY,
        kind         TEXT    NOT NULL,
        case_id      TEXT,
        created_at   REAL    NOT NULL,
        wall_trusted INTEGER NOT NULL,
        payload      TEXT    NOT NULL,
        acked_at     REAL
    );
    CREATE INDEX outbox_pending ON outbox (id) WHERE acked_at IS NULL;
    -- Every attempt to reach a person, and how it went.
    CREATE TABLE notifications (
        id        INTEGER PRIMARY KEY,
        at        REAL    NOT NULL,
        case_id   TEXT,
        person_id TEXT    NOT NULL,
        kind      TEXT    NOT NULL,
        channel   TEXT,
        outcome   TEXT    NOT NULL,
        detail    TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX notifications_case ON notifications (case_id, id);
    """,
    # 3: district sync.  store_id names this database for ever: outbox ids
    # restart at 1 in a new database (an SD card replaced), and the district
    # must not mistake those records for ones it already has.
    """
    CREATE TABLE sync_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO sync_state (key, value) VALUES ('store_id', lower(hex(randomblob(16))));
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

JournalRow = tuple[CallerEvent, bytes]  # the event and the MAC of its frame

_INSERT = """
INSERT INTO events (device_id, counter, kind, key, battery_mv, battery_pct, signal_dbm,
                    external_power, low_battery, link, received_at, wall_trusted, mac)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_RESERVE = """
INSERT INTO downlink_counters (device_id, reserved) VALUES (?, ?)
ON CONFLICT (device_id) DO UPDATE SET reserved = MAX(reserved, excluded.reserved)
"""


@dataclass
class DeskWrites:
    """What the desk decided for a batch, written in the batch's transaction."""

    cases: list[Case] = field(default_factory=list)
    notices: list[tuple[Notice, bool]] = field(default_factory=list)  # (notice, cleared)
    outbox: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    desk_events: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    at: float = 0.0
    wall_trusted: bool = True

    def __bool__(self) -> bool:
        return bool(self.cases or self.notices or self.outbox or self.desk_events)


@dataclass(frozen=True)
class DeskState:
    """What the desk needs back after a restart."""

    cases: list[Case]
    notices: list[Notice]
    last_seen: dict[int, float]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox record as the sync sends it; ``payload`` is the stored JSON text."""

    id: int
    kind: str
    case_id: str | None
    created_at: float
    wall_trusted: bool
    payload: str


@dataclass(frozen=True, slots=True)
class OutboxStats:
    backlog: int  # records not yet acknowledged by the district
    oldest_id: int | None
    oldest_created_at: float | None  # wall time of the oldest unacknowledged record
    acked: int  # acknowledged records still kept (until the retention period ends)


@dataclass
class _NoteGroup:
    done: asyncio.Future[None]
    rows: list[tuple[object, ...]] = field(default_factory=list)


class StoreError(Exception):
    """The store could not do what was asked (disk full, I/O error, newer schema)."""


def _row(event: CallerEvent, mac: bytes) -> tuple[object, ...]:
    common_tail = (event.link, event.received_at, int(event.wall_trusted), mac)
    if isinstance(event, KeyPressed):
        return (
            event.device_id,
            event.counter,
            "key",
            int(event.key),
            None,
            None,
            None,
            None,
            None,
            *common_tail,
        )
    if isinstance(event, HeartbeatReceived):
        return (
            event.device_id,
            event.counter,
            "heartbeat",
            None,
            event.battery_mv,
            event.battery_pct,
            event.signal_dbm,
            int(event.external_power),
            int(event.low_battery),
            *common_tail,
        )
    raise TypeError(f"cannot journal {event!r}")


def _event(row: sqlite3.Row) -> CallerEvent:
    common = dict(
        device_id=row["device_id"],
        counter=row["counter"],
        link=row["link"],
        received_at=row["received_at"],
        wall_trusted=bool(row["wall_trusted"]),
    )
    if row["kind"] == "key":
        return KeyPressed(key=Key(row["key"]), **common)
    return HeartbeatReceived(
        battery_mv=row["battery_mv"],
        battery_pct=row["battery_pct"],
        signal_dbm=row["signal_dbm"],
        external_power=bool(row["external_power"]),
        low_battery=bool(row["low_battery"]),
        **common,
    )


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # aiosqlite runs one statement at a time, but a transaction spans
        # several awaits; without this another writer's statement could land
        # inside it (and be rolled back with it).
        self._write = asyncio.Lock()
        # Notification records that wait for the same transaction (see record_notification).
        self._notes: _NoteGroup | None = None
        self._note_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, path: Path | str, *, synchronous: Literal["FULL", "NORMAL"] = "FULL"
    ) -> Store:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={synchronous}")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            store = cls(db, path)
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction; the lock keeps other writers' statements out of it."""
        async with self._write:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (a full disk);
                # a second ROLLBACK would hide the real error.
                if self._db.in_transaction:
                    await self._db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this gateway "
                f"understands ({SCHEMA_VERSION}); install the newer gateway again"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            script = _MIGRATIONS[target - 1]
            # One transaction per step: a power cut mid-migration leaves the
            # previous version intact rather than half a schema.
            await self._db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={target};\nCOMMIT;"
            )

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def append(
        self,
        rows: Sequence[JournalRow],
        *,
        downlink_reservations: dict[int, int] | None = None,
        desk: DeskWrites | None = None,
    ) -> None:
        """Write a batch of events in one transaction; durable when this returns.

        Downlink counter reservations needed to acknowledge the batch ride in
        the same transaction, so acknowledging costs no extra fsync.
        """
        if not rows and not desk:
            return
        values = [_row(e, mac) for e, mac in rows]
        try:
            async with self._transaction():
                await self._db.executemany(_INSERT, values)
                if downlink_reservations:
                    await self._db.executemany(_RESERVE, downlink_reservations.items())
                if desk:
                    await self._write_desk(desk)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not write {len(rows)} events: {exc}") from exc

    async def _write_desk(self, w: DeskWrites) -> None:
        db, trusted = self._db, int(w.wall_trusted)
        if w.desk_events:
            await db.executemany(
                "INSERT INTO desk_events (at, wall_trusted, kind, case_id, data) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (w.at, trusted, kind, case_id, _json(data))
                    for kind, case_id, data in w.desk_events
                ],
            )
        if w.cases:
            await db.executemany(
                "INSERT INTO cases (id, device_id, state, open, opened_at, updated_at, "
                "resolved_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, open = excluded.open, "
                "updated_at = excluded.updated_at, resolved_at = excluded.resolved_at, "
                "data = excluded.data",
                [
                    (
                        c.id,
                        c.device_id,
                        c.state.value,
                        int(c.open),
                        c.opened_at,
                        w.at,
                        c.resolved_at,
                        _json(case_to_dict(c)),
                    )
                    for c in w.cases
                ],
            )
        for notice, cleared in w.notices:
            if cleared:
                await db.execute(
                    "DELETE FROM notices WHERE device_id = ? AND kind = ?",
                    (notice.device_id, notice.kind.value),
                )
            else:
                await db.execute(
                    "INSERT OR REPLACE INTO notices (device_id, kind, data) VALUES (?, ?, ?)",
                    (notice.device_id, notice.kind.value, _json(notice_to_dict(notice))),
                )
        if w.outbox:
            await db.executemany(
                "INSERT INTO outbox (kind, case_id, created_at, wall_trusted, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                [(kind, case_id, w.at, trusted, _json(p)) for kind, case_id, p in w.outbox],
            )

    async def load_desk_state(self, *, now: float, rating_window_s: float) -> DeskState:
        """Open cases, each caller's latest ratable resolved case, notices, last contact."""
        async with self._db.execute(
            "SELECT data FROM cases WHERE open = 1 "
            "UNION ALL "
            "SELECT data FROM (SELECT data, ROW_NUMBER() OVER "
            "  (PARTITION BY device_id ORDER BY resolved_at DESC) AS n "
            "  FROM cases WHERE open = 0 AND resolved_at >= ?) WHERE n = 1",
            (now - rating_window_s,),
        ) as cur:
            cases = [case_from_dict(json.loads(r[0])) for r in await cur.fetchall()]
        async with self._db.execute("SELECT data FROM notices") as cur:
            notices = [notice_from_dict(json.loads(r[0])) for r in await cur.fetchall()]
        async with self._db.execute(
            "SELECT device_id, MAX(received_at) FROM events GROUP BY device_id"
        ) as cur:
            last_seen = {int(d): float(t) for d, t in await cur.fetchall()}
        return DeskState(cases, notices, last_seen)

    async def cases(self, *, open_only: bool = False, limit: int = 100) -> list[Case]:
        """Cases, newest first."""
        sql = "SELECT data FROM cases"
        if open_only:
            sql += " WHERE open = 1"
        sql += " ORDER BY opened_at DESC, id DESC LIMIT ?"
        async with self._db.execute(sql, (limit,)) as cur:
            return [case_from_dict(json.loads(r[0])) for r in await cur.fetchall()]

    async def case(self, case_id: str) -> Case | None:
        async with self._db.execute("SELECT data FROM cases WHERE id = ?", (case_id,)) as cur:
            row = await cur.fetchone()
        return case_from_dict(json.loads(row[0])) if row else None

    async def record_notification(
        self,
        *,
        at: float,
        case_id: str | None,
        person_id: str,
        kind: str,
        channel: str | None,
        outcome: str,
        detail: str = "",
    ) -> None:
        """Durable when this returns.

        A burst of calls notifies as many people at once; one transaction per
        record would queue that many fsyncs on the write lock ahead of the next
        batch of presses.  Records that arrive while one group waits for the
        lock join it and share its commit.
        """
        group = self._notes
        if group is None:
            group = self._notes = _NoteGroup(asyncio.get_running_loop().create_future())
            task = asyncio.get_running_loop().create_task(self._write_notes(group))
            self._note_tasks.add(task)
            task.add_done_callback(self._note_tasks.discard)
        group.rows.append((at, case_id, person_id, kind, channel, outcome, detail))
        # Shielded: a caller that stops waiting must not abandon the others' records.
        await asyncio.shield(group.done)

    async def _write_notes(self, group: _NoteGroup) -> None:
        try:
            async with self._transaction():
                if self._notes is group:
                    self._notes = None  # later records start the next group
                await self._db.executemany(
                    "INSERT INTO notifications (at, case_id, person_id, kind, channel, outcome, "
                    "detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    group.rows,
                )
        except sqlite3.Error as exc:
            if self._notes is group:
                self._notes = None
            group.done.set_exception(
                StoreError(f"{self.path}: could not record a notification: {exc}")
            )
        except BaseException as exc:
            if self._notes is group:
                self._notes = None
            if not group.done.done():
                group.done.set_exception(StoreError(f"{self.path}: store closing: {exc!r}"))
            raise
        else:
            group.done.set_result(None)

    async def notifications(self, case_id: str) -> list[dict[str, Any]]:
        async with self._db.execute(
            "SELECT at, person_id, kind, channel, outcome, detail FROM notifications "
            "WHERE case_id = ? ORDER BY id",
            (case_id,),
        ) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def prune_heartbeats(self, before: float, limit: int = 50_000) -> int:
        """Delete heartbeats older than ``before``, keeping each caller's newest
        frame: replay protection needs every caller's highest counter.

        Presses are never pruned here; heartbeats are most of the journal (a
        village of 300 callers sends 86,000 a day) and an SD card is small.
        """
        try:
            async with self._write:
                cur = await self._db.execute(
                    "DELETE FROM events WHERE id IN ("
                    " SELECT e.id FROM events e WHERE e.kind = 'heartbeat' AND e.received_at < ?"
                    " AND e.counter < (SELECT MAX(counter) FROM events m"
                    "                  WHERE m.device_id = e.device_id)"
                    " LIMIT ?)",
                    (before, limit),
                )
                return cur.rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not prune heartbeats: {exc}") from exc

    async def outbox_count(self) -> int:
        async with self._db.execute("SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def high_water_marks(self) -> dict[int, int]:
        async with self._db.execute(
            "SELECT device_id, MAX(counter) FROM events GROUP BY device_id"
        ) as cur:
            return {int(d): int(c) for d, c in await cur.fetchall()}

    async def frame_mac(self, device_id: int, counter: int) -> bytes | None:
        async with self._db.execute(
            "SELECT mac FROM events WHERE device_id = ? AND counter = ?", (device_id, counter)
        ) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row else None

    async def events(self, *, device_id: int | None = None, limit: int = 1000) -> list[CallerEvent]:
        """Journalled events, oldest first."""
        sql = "SELECT * FROM events"
        args: tuple[object, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            args = (device_id,)
        sql += " ORDER BY id LIMIT ?"
        async with self._db.execute(sql, (*args, limit)) as cur:
            return [_event(r) for r in await cur.fetchall()]

    async def downlink_reservations(self) -> dict[int, int]:
        async with self._db.execute("SELECT device_id, reserved FROM downlink_counters") as cur:
            return {int(d): int(r) for d, r in await cur.fetchall()}

    async def reserve_downlink(self, device_id: int, up_to: int) -> None:
        try:
            async with self._write:
                await self._db.execute(_RESERVE, (device_id, up_to))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not reserve downlink counters: {exc}") from exc

    # --- district sync (gateway/sync.py) ------------------------------------

    async def outbox_batch(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Unacknowledged records with ``id > after_id``, oldest first."""
        async with self._db.execute(
            "SELECT id, kind, case_id, created_at, wall_trusted, payload FROM outbox "
            "WHERE acked_at IS NULL AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ) as cur:
            return [
                OutboxRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in await cur.fetchall()
            ]

    async def outbox_ack(self, ids: Sequence[int], at: float) -> int:
        """Mark records acknowledged by the district; returns how many were newly marked."""
        if not ids:
            return 0
        try:
            async with self._transaction():
                cur = await self._db.executemany(
                    "UPDATE outbox SET acked_at = ? WHERE id = ? AND acked_at IS NULL",
                    [(at, i) for i in ids],
                )
                changed = cur.rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not mark outbox records sent: {exc}") from exc
        return max(changed, 0)

    async def outbox_prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` records acknowledged before ``before``; never unacked ones.

        The newest row is always kept: ``id`` is not AUTOINCREMENT, so SQLite
        would hand a deleted maximum id out again, and the district would take
        a new record for one it already has.
        """
        try:
            async with self._write:
                cur = await self._db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
                    "WHERE acked_at IS NOT NULL AND acked_at < ? "
                    "AND id < (SELECT MAX(id) FROM outbox) ORDER BY id LIMIT ?)",
                    (before, limit),
                )
                return max(cur.rowcount, 0)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not prune the outbox: {exc}") from exc

    async def outbox_stats(self, *, count_acked: bool = True) -> OutboxStats:
        """Backlog and its oldest record (cheap: the pending index); ``acked`` is a
        table scan, so it is 0 unless ``count_acked``."""
        async with self._db.execute(
            "SELECT COUNT(*), MIN(id) FROM outbox WHERE acked_at IS NULL"
        ) as cur:
            row = await cur.fetchone()
        backlog, oldest_id = (int(row[0]), row[1]) if row else (0, None)
        oldest_at = None
        if oldest_id is not None:
            async with self._db.execute(
                "SELECT created_at FROM outbox WHERE id = ?", (oldest_id,)
            ) as cur:
                r = await cur.fetchone()
            oldest_at = float(r[0]) if r else None
        acked = 0
        if count_acked:
            async with self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE acked_at IS NOT NULL"
            ) as cur:
                row = await cur.fetchone()
            acked = int(row[0]) if row else 0
        return OutboxStats(backlog, oldest_id, oldest_at, acked)

    async def store_id(self) -> str:
        """This database's identity, made once by the migration that added sync."""
        value = await self.sync_state("store_id")
        if value is None:
            raise StoreError(f"{self.path}: sync_state has no store_id")
        return value

    async def sync_state(self, key: str) -> str | None:
        async with self._db.execute("SELECT value FROM sync_state WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_sync_state(self, values: dict[str, str | None]) -> None:
        """Set (or, for None, delete) sync bookkeeping values in one transaction."""
        try:
            async with self._transaction():
                for key, value in values.items():
                    if value is None:
                        await self._db.execute("DELETE FROM sync_state WHERE key = ?", (key,))
                    else:
                        await self._db.execute(
                            "INSERT OR REPLACE INTO sync_state (key, value) VALUES (?, ?)",
                            (key, value),
                        )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not save sync state: {exc}") from exc
