"""The district's downlink corpus, good and bad, published to the running daemon.

The fuzz tests drive the syncer in-process; this is the same input through the
real broker into `python -m gateway run`: the daemon keeps serving presses and
keeps syncing, and only pushes that check out are put in force.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import aiomqtt
import pytest

from ..conftest import Broker, write_config
from ..e2e.conftest import Daemon, simulate
from ..sync.conftest import Central, CentralTarget
from .test_fuzz import ACKS_BAD, ACKS_OK, D_VILLAGE, PUSHES_BAD, PUSHES_OK

pytestmark = pytest.mark.e2e


def _outbox_unacked(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0])


async def test_daemon_survives_the_downlink_corpus_and_keeps_syncing(
    tmp_path: Path, fresh_broker: Broker, daemon_factory
) -> None:
    cfg = write_config(tmp_path / "gw", mqtt_port=fresh_broker.port, village=D_VILLAGE)
    with cfg.open("a") as fh:
        fh.write(
            f'\n[sync]\nhost = "127.0.0.1"\nport = {fresh_broker.port}\n'
            "ack_timeout_s = 2.0\nretry_min_s = 0.1\nretry_max_s = 0.5\npoll_interval_s = 0.1\n"
        )
    db = tmp_path / "gw" / "gateway.db"
    central_db = tmp_path / "central.db"
    target = CentralTarget("sqlite", ["--db", f"sqlite:{central_db}"], path=central_db)
    central = Central(fresh_broker.port, target).start()
    try:
        await central.ready()
        await _replay(cfg, db, fresh_broker, target, daemon_factory, tmp_path)
    finally:
        central.kill()


async def _replay(cfg: Path, db: Path, fresh_broker: Broker, target: CentralTarget,
                  daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = f"district/{D_VILLAGE}"
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    await asyncio.to_thread(daemon.wait_for, "connected to the district broker")

    messages = [(f"{prefix}/sync/ack", line) for line in ACKS_OK + ACKS_BAD]
    messages += [(f"{prefix}/config/push", line) for line in PUSHES_OK + PUSHES_BAD]
    messages += [(f"{prefix}/sync/ack", "\xff\xfe not even text"), (f"{prefix}/config/push", "")]
    async with aiomqtt.Client("127.0.0.1", fresh_broker.port, identifier="fuzz-district") as c:
        for topic, line in messages:
            await c.publish(topic, line.encode("utf-8", "surrogateescape"), qos=1)

    # Still serving: a press is acknowledged and its case reaches the district.
    r = simulate(cfg, "--device", "1001", "--mqtt", f"127.0.0.1:{fresh_broker.port}",
                 "--key", "call", state=tmp_path / "sim")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 40
    while _outbox_unacked(db):
        assert daemon.proc.poll() is None, "".join(daemon.lines)
        assert time.monotonic() < deadline, f"{_outbox_unacked(db)} records never acknowledged"
        await asyncio.sleep(0.1)
    assert await target.count() > 0

    events = daemon.events()
    assert not [e for e in events if e.get("event") == "district sync failed unexpectedly"]
    unusable = {
        e["topic"] for e in events if e.get("event") == "unusable message from the district"
    }
    assert unusable == {f"{prefix}/sync/ack", f"{prefix}/config/push"}
    # Pushes that say enough to be answered were answered, at the district.
    deadline = time.monotonic() + 20
    while not await target.reports():
        assert time.monotonic() < deadline, "no configuration report reached the district"
        await asyncio.sleep(0.1)
    # Every push that was not put in force was answered with its reasons.
    applied = [e for e in events if e.get("event") == "district configuration in force"]
    valid_here = [json.loads(p) for p in PUSHES_OK if json.loads(p).get("village") == D_VILLAGE]
    assert len(applied) <= len(valid_here)
    assert daemon.stop() == 0
