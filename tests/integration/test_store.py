"""The SQLite store: migrations, the journal, pruning."""

from __future__ import annotations

from firmware_protocol import Key
from gateway.events import HeartbeatReceived, KeyPressed
from gateway.store import SCHEMA_VERSION, Store


def _hb(device: int, counter: int, at: float) -> HeartbeatReceived:
    return HeartbeatReceived(device, counter, "mqtt", at, True, 3000, 80, None, True, False)


async def test_old_heartbeats_are_pruned_but_counters_and_presses_stay(tmp_path):
    store = await Store.open(tmp_path / "g.db")
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        old, new = 1_000.0, 9_000_000.0
        rows = [(_hb(1, c, old), bytes(8)) for c in range(1, 11)]
        rows.append((KeyPressed(1, 11, "mqtt", old, True, Key.CALL), bytes(8)))
        rows.append((_hb(1, 12, new), bytes(8)))
        rows.append((_hb(2, 5, old), bytes(8)))  # caller 2's only frame
        await store.append(rows)
        marks = await store.high_water_marks()
        assert await store.prune_heartbeats(before=new - 1) == 10
        left = [(e.device_id, e.counter) for e in await store.events()]
        assert left == [(1, 11), (1, 12), (2, 5)]
        assert await store.high_water_marks() == marks
        assert await store.prune_heartbeats(before=new - 1) == 0
    finally:
        await store.close()


async def test_reopening_runs_no_migration_twice(tmp_path):
    store = await Store.open(tmp_path / "g.db")
    await store.append([(_hb(1, 1, 1.0), bytes(8))])
    await store.close()
    store = await Store.open(tmp_path / "g.db")
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        assert [e.counter for e in await store.events()] == [1]
    finally:
        await store.close()
