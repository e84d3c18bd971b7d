"""Fault campaign: the MQTT broker restarted under load, twice.

Twenty callers keep pressing over MQTT while the broker goes away and comes
back on the same port: once stopped cleanly (it saves its sessions), once
killed (it comes back with the sessions and queued messages of its last save,
stale ones included).  The gateway, the callers and the district's central
store all use that broker, so every one of them loses its connection twice.

Afterwards every press a caller saw acknowledged is in the gateway's journal
once, the presses made while the broker was away were repeated and
acknowledged once it was back, and the district holds every record once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO, Broker, write_config
from ..e2e.conftest import Daemon
from ..sync.conftest import Central, CentralTarget
from .district import (
    DistrictSide,
    GatewaySide,
    acked_presses,
    check_presses_at_district,
    check_records_exactly_once,
    journal_presses,
    read_press_log,
    sync_section,
    unacked,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CALLERS = 20
RATE = 25.0  # presses per second, all callers together
OUTAGE_S = 3.0  # how long the broker stays away; presses made meanwhile must come through


def _key_rows(db: Path) -> int:
    return len(journal_presses(db)) if db.exists() else 0


def _outage(broker: Broker, *, abrupt: bool) -> tuple[float, float]:
    """Take the broker away and bring it back; the wall-clock span it was surely gone."""
    if abrupt:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
        broker.proc = None
    else:
        broker.stop()
    gone = time.time()
    time.sleep(OUTAGE_S)
    back = time.time()
    broker.start()
    return gone, back


def test_broker_restarted_under_load_loses_and_doubles_nothing(
    tmp_path: Path, fresh_broker: Broker, daemon_factory: list[Daemon]
) -> None:
    village = "brokerfall"
    cfg = write_config(tmp_path, mqtt_port=fresh_broker.port, village=village)
    with cfg.open("a") as fh:
        fh.write(sync_section(fresh_broker.port, f"sync-{village}"))
    db = tmp_path / "gateway.db"
    central_db = tmp_path / "central.db"
    central = Central(
        fresh_broker.port, CentralTarget("sqlite", ["--db", f"sqlite:{central_db}"], central_db)
    )
    presses_log = tmp_path / "presses.jsonl"
    load: subprocess.Popen[str] | None = None
    try:
        central.start()
        asyncio.run(central.ready())
        daemon = Daemon(cfg)
        daemon_factory.append(daemon)
        daemon.wait_for("connected to the district broker")
        load = subprocess.Popen(
            [sys.executable, "-m", "simulators.caller", "--config", str(cfg),
             "--state-dir", str(tmp_path / "sim"), "--many", str(CALLERS),
             "--rate", str(RATE), "--duration", "600", "--heartbeat", "0",
             "--timeout", "120", "--press-log", str(presses_log),
             "--mqtt", f"127.0.0.1:{fresh_broker.port}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        outages: list[tuple[float, float]] = []
        for abrupt in (False, True):
            # Each outage hits a load in full flow: presses being stored,
            # acknowledged and synced when the broker goes.
            before = _key_rows(db)
            wait_until(lambda b=before: _key_rows(db) >= b + 40, "presses flow", 120)
            assert load.poll() is None, f"the load ended early: {load.communicate()}"
            outages.append(_outage(fresh_broker, abrupt=abrupt))
        # And flows again after the second: everyone reconnected.
        before = _key_rows(db)
        wait_until(lambda: _key_rows(db) >= before + 40, "presses flow after the restarts", 120)
        assert load.poll() is None, f"the load ended early: {load.communicate()}"
        load.send_signal(signal.SIGTERM)
        out, err = load.communicate(timeout=180)
        assert load.returncode == 0, out + err
        summary = json.loads(out)
        print("load summary:", summary)
        assert summary["not_acknowledged"] == 0, summary
        assert summary["send_failures"] > 0, "the callers never noticed the broker was away"

        # The district has acknowledged every record before the gateway stops.
        wait_until(lambda: unacked(db) == 0, "the outbox drains to the district", 120)
        assert daemon.stop() == 0
        assert daemon.proc.returncode == 0
        for e in daemon.events():
            assert e.get("event") != "district sync failed unexpectedly", e
        # A deadline may fire between the last acknowledgement and the stop.
        if unacked(db):
            daemon = Daemon(cfg)
            daemon_factory.append(daemon)
            wait_until(lambda: unacked(db) == 0, "the outbox drains to the district", 120)
            assert daemon.stop() == 0
        assert unacked(db) == 0
        gw, district = GatewaySide.read(db), DistrictSide.read(central_db, village)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        central.kill()

    log = read_press_log(presses_log)
    # Every press a caller saw acknowledged is in the journal exactly once, and
    # nothing else is there.
    journal = journal_presses(db)
    assert len(journal) == len(set(journal))
    assert sorted(journal) == acked_presses(log)
    assert len(log) == summary["presses"]
    # Presses first sent while the broker was surely gone were repeated, and
    # acknowledged after it came back.
    for gone, back in outages:
        during = [p for p in log if gone <= p["sent_at"] <= back]
        assert during, "no press was made while the broker was away"
        for p in during:
            assert p["acked"], p
            assert p["attempts"] > 1, p
            assert p["done_at"] > back, p
    # And the district holds every record once, every press's mark once.
    check_records_exactly_once(gw, district)
    check_presses_at_district(journal, district)
