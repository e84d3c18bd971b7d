"""The gateway's SQLite store: schema, migrations and the caller journal.

WAL with ``synchronous=FULL``: a row is on disk when ``commit`` returns, which
is what lets the intake acknowledge a press only after it is durable.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import aiosqlite

from firmware_protocol import Key

from .events import CallerEvent, HeartbeatReceived, KeyPressed

__all__ = ["SCHEMA_VERSION", "JournalRow", "Store", "StoreError"]

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
        self, rows: Sequence[JournalRow], *, downlink_reservations: dict[int, int] | None = None
    ) -> None:
        """Write a batch of events in one transaction; durable when this returns.

        Downlink counter reservations needed to acknowledge the batch ride in
        the same transaction, so acknowledging costs no extra fsync.
        """
        if not rows:
            return
        values = [_row(e, mac) for e, mac in rows]
        try:
            async with self._write:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await self._db.executemany(_INSERT, values)
                    if downlink_reservations:
                        await self._db.executemany(_RESERVE, downlink_reservations.items())
                    await self._db.execute("COMMIT")
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not write {len(rows)} events: {exc}") from exc

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
