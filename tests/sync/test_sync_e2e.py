"""The daemon, as systemd runs it, killed with SIGKILL while a batch is in flight."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.store import Store

from ..conftest import Broker, write_config
from ..e2e.conftest import Daemon
from .conftest import VILLAGE, Central, CentralTarget, check_exactly_once, fill_outbox

pytestmark = pytest.mark.e2e


def _unacked(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0])


async def test_gateway_killed_in_the_middle_of_a_batch_loses_and_repeats_nothing(
    tmp_path: Path,
    fresh_broker: Broker,
    central_target: CentralTarget,
    centrals: list[Central],
) -> None:
    cfg = write_config(tmp_path / "gw", mqtt_port=fresh_broker.port, village=VILLAGE)
    with cfg.open("a") as fh:
        fh.write(
            f'\n[sync]\nhost = "127.0.0.1"\nport = {fresh_broker.port}\n'
            f'client_id = "sync-{tmp_path.name}"\n'
            "ack_timeout_s = 2.0\nretry_min_s = 0.1\nretry_max_s = 0.5\npoll_interval_s = 0.1\n"
        )
    db = tmp_path / "gw" / "gateway.db"
    # The backlog is there before the daemon starts, as after a long outage.
    store = await Store.open(db)
    total = await fill_outbox(store, cases=500, versions=10)
    await store.close()

    # Each commit takes 0.4 s: the third batch is surely in flight at the kill.
    slow = {"CENTRAL_STORE_COMMIT_DELAY_S": "0.4"}
    central = Central(fresh_broker.port, central_target, env=slow)
    centrals.append(central.start())
    await central.ready()
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(cfg))
        await asyncio.to_thread(daemons[0].wait_for, "connected to the district broker")
        await central.wait_for("batch received", 3)
        daemons[0].stop(signal.SIGKILL)
        assert _unacked(db) > 0
        # The central store commits that batch and acknowledges it into the
        # gateway's persistent session, or the restarted gateway sends it again.
        daemons.append(Daemon(cfg))
        await asyncio.to_thread(daemons[1].wait_for, "gateway ready")
        deadline = time.monotonic() + 40
        while _unacked(db):
            assert time.monotonic() < deadline, f"{_unacked(db)} records never acknowledged"
            await asyncio.sleep(0.1)
        assert daemons[1].stop() == 0
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
    store = await Store.open(db)
    try:
        await check_exactly_once(central_target, store, total)
    finally:
        await store.close()
