"""Fault campaign: ``kill -9`` of the daemon at random moments, twenty times in a
row, while callers keep pressing over MQTT and the district's reference central
store takes every case the gateway syncs.

The caller simulator runs throughout with a long ``--timeout``: a press the
dead daemon never acknowledged is repeated, byte for byte, until a restarted
daemon acknowledges it.  The seed makes the kill moments reproducible; the
press pattern itself is the simulator's own (unseeded) randomness, which is
fine: the invariants below hold for any pattern.

Exactly once is checked at both ends: in the gateway's journal, and at the
central store, which must hold every acknowledged press's mark once (see
``district.py``) and every case at the gateway's final version.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from firmware_protocol import Key
from gateway.config import load_gateway_file
from simulators.caller import CounterFile, MqttBus, SimCaller

from ..conftest import REPO, Broker, write_config
from ..e2e.conftest import Daemon
from ..integration.helpers import caller_key
from ..sync.conftest import Central, CentralTarget
from .district import (
    DistrictSide,
    GatewaySide,
    Press,
    acked_presses,
    check_presses_at_district,
    check_records_exactly_once,
    journal_presses,
    read_press_log,
    sync_section,
    unacked,
    wait_until,
)

# Twenty restarts, the load, and the drain to the district: well past the default.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

SEED = 20240607
KILLS = 20
CALLERS = 20
RATE = 25.0  # presses per second, all callers together: kills land on commits in flight


def _db_rows(db: Path) -> tuple[list[tuple[int, int, int]], list[dict[str, Any]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        keys = conn.execute(
            "SELECT device_id, counter, key FROM events WHERE kind = 'key' ORDER BY id"
        ).fetchall()
        cases = [
            {**json.loads(data), "_open": bool(is_open), "_device": device}
            for data, is_open, device in conn.execute("SELECT data, open, device_id FROM cases")
        ]
    return keys, cases


async def _green_again(port: int, prefix: str, devices: list[int], counters: Path) -> list[Press]:
    """One green press from each caller, as the same callers (their counters go on)."""
    bus = MqttBus("127.0.0.1", port, prefix)
    store = CounterFile(counters)
    callers = {d: SimCaller(d, caller_key(d), store, bus.send) for d in devices}
    bus.callers.update(callers)
    async with bus:
        results = await asyncio.gather(*(c.press(Key.CALL, give_up_s=60) for c in callers.values()))
    store.flush()
    assert all(r.acked for r in results), results
    return [Press(r.device_id, r.counter, "call") for r in results]


def _settle(cfg: Path, db: Path, daemon_factory: list[Daemon]) -> None:
    """Run the daemon until the district has acknowledged every record, then stop
    it cleanly.  A deadline may fire between the last acknowledgement and the
    stop and make one record more; then once again."""
    for _ in range(5):
        daemon = Daemon(cfg)
        daemon_factory.append(daemon)
        daemon.wait_for("gateway ready")
        wait_until(lambda: unacked(db) == 0, "the outbox drains to the district", 120)
        assert daemon.stop() == 0
        if unacked(db) == 0:
            return
    raise AssertionError("the outbox never stayed drained over a clean stop")


def test_twenty_kill_9_lose_no_acknowledged_press(
    tmp_path: Path, broker: Broker, daemon_factory: list[Daemon]
) -> None:
    rng = random.Random(SEED)
    village = "kill9"
    cfg = write_config(tmp_path, mqtt_port=broker.port, village=village)
    with cfg.open("a") as fh:
        fh.write(sync_section(broker.port, f"sync-{village}-{tmp_path.name}"))
    db = tmp_path / "gateway.db"
    central_db = tmp_path / "central.db"
    # A group of its own: the session's broker may carry other tests' stores.
    central = Central(
        broker.port,
        CentralTarget("sqlite", ["--db", f"sqlite:{central_db}"], path=central_db),
        group=f"kill9{tmp_path.name}".replace("-", "")[:40],
    )
    try:
        central.start()
        asyncio.run(central.ready())
        _campaign(tmp_path, broker, cfg, db, rng, daemon_factory)
        _settle(cfg, db, daemon_factory)
        gw, district = GatewaySide.read(db), DistrictSide.read(central_db, village)
    finally:
        central.kill()
    check_records_exactly_once(gw, district)
    presses = journal_presses(db)
    assert len(presses) == len(set(presses))
    check_presses_at_district(presses, district)


def _campaign(
    tmp_path: Path,
    broker: Broker,
    cfg: Path,
    db: Path,
    rng: random.Random,
    daemon_factory: list[Daemon],
) -> None:
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")

    delays = [rng.uniform(0.2, 1.0) for _ in range(KILLS)]
    # Keep pressing for the whole campaign, so kills land on commits, acks and
    # feedback in flight.  A restart takes as long as a busy machine makes it,
    # so the load runs until told to stop rather than for a guessed time.
    duration = 600.0
    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.caller",
            "--config",
            str(cfg),
            "--state-dir",
            str(tmp_path / "sim"),
            "--many",
            str(CALLERS),
            "--rate",
            str(RATE),
            "--duration",
            f"{duration:.1f}",
            "--heartbeat",
            "0",
            "--timeout",
            "120",
            "--press-log",
            str(tmp_path / "presses.jsonl"),
            "--mqtt",
            f"127.0.0.1:{broker.port}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for i, delay in enumerate(delays):
            time.sleep(delay)
            assert load.poll() is None, f"the load ended early: {load.communicate()}"
            daemon.stop(signal.SIGKILL)
            daemon = Daemon(cfg)
            daemon_factory.append(daemon)
            daemon.wait_for("gateway ready")
            assert daemon.proc.poll() is None, f"restart {i + 1} died"
        # The last daemon stays up until every repeated press is acknowledged.
        load.send_signal(signal.SIGTERM)
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, out + err
    summary = json.loads(out)
    print("load summary:", summary)
    assert summary["presses"] >= 40, summary  # the campaign really ran under load
    assert summary["not_acknowledged"] == 0, summary
    assert summary["acknowledged"] == summary["presses"]
    seen_acked = acked_presses(read_press_log(tmp_path / "presses.jsonl"))
    assert len(seen_acked) == summary["acknowledged"]

    # Every case resumes: stop cleanly, start once more, and the daemon
    # restores exactly the open cases the database holds, each with its timer.
    assert daemon.stop() == 0
    _, cases_before = _db_rows(db)
    open_before = sum(c["_open"] for c in cases_before)
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    if cases_before:
        restored = daemon.wait_for("cases restored")
        assert restored["open"] == open_before
        # Nobody answers in this test, so every open case is waiting for
        # someone and must have a pending deadline.
        assert restored["deadlines"] == open_before
    # And it carries on with them: a green press from each caller with a case
    # open is taken into that case, not made a new one.
    open_devices = sorted({int(c["_device"]) for c in cases_before if c["_open"]})
    prefix = load_gateway_file(cfg).topic_prefix
    more = asyncio.run(
        _green_again(broker.port, prefix, open_devices, tmp_path / "sim" / "counters.json")
    )
    seen_acked = sorted([*seen_acked, *more])
    assert daemon.stop() == 0
    _, after = _db_rows(db)
    still_open = {c["id"] for c in after if c["_open"]}
    assert still_open == {c["id"] for c in cases_before if c["_open"]}

    keys, cases = _db_rows(db)
    # Every acknowledged press is in the journal exactly once, and nothing
    # else is.  A press that was stored but whose ack died with the daemon was
    # repeated and re-acked as a duplicate, never stored a second time.
    idents = [(d, c) for d, c, _k in keys]
    assert len(set(idents)) == len(idents)
    assert sorted(journal_presses(db)) == seen_acked

    # Cases.  The desk handles a green press in one of two ways: with no open
    # case for the caller it opens case "<device>-<counter>"; with one open it
    # absorbs the press into that case as a "green_again" transition.  The
    # press and the desk's decision are committed in one transaction, so
    # whatever the kills did, for every caller:
    #     green presses == cases opened + green_again transitions
    # and every case id names a green press of its caller in the journal.
    greens = Counter(d for d, _c, k in keys if k == int(Key.CALL))
    green_idents = {(d, c) for d, c, k in keys if k == int(Key.CALL)}
    opened: Counter[int] = Counter()
    absorbed: Counter[int] = Counter()
    open_per_device: Counter[int] = Counter()
    for case in cases:
        device = int(case["_device"])
        assert case["id"] == f"{device}-{case['counter']}"
        assert (device, case["counter"]) in green_idents, f"case {case['id']} has no green press"
        opened[device] += 1
        absorbed[device] += sum(1 for t in case["transitions"] if t["cause"] == "green_again")
        if case["_open"]:
            open_per_device[device] += 1
            # The desk persists the pending deadline with the case; without it
            # a restart could not re-arm the escalation.
            assert case["deadline"] is not None, case
            assert case["deadline"]["due_at"] > case["opened_at"]  # type: ignore[index]
    for device in greens.keys() | opened.keys():
        assert greens[device] == opened[device] + absorbed[device], (
            device,
            greens[device],
            opened[device],
            absorbed[device],
        )
    assert all(n == 1 for n in open_per_device.values()), open_per_device
    assert sum(greens.values()) > 0
