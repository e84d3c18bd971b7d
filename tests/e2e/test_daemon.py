"""The daemon as systemd runs it: a subprocess, driven by the caller simulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import REPO, Broker, PtyPair, write_config
from .conftest import Daemon, journal, simulate

pytestmark = pytest.mark.e2e


def test_presses_over_serial_and_mqtt_reach_the_journal(
    tmp_path, pty_pair: PtyPair, broker: Broker, daemon_factory
):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="e2e"
    )
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    state = tmp_path / "sim"

    r = simulate(
        cfg, "--device", "1001", "--serial", str(pty_pair.device_port), "--key", "call", state=state
    )
    assert r.returncode == 0, r.stderr
    assert "call acknowledged" in r.stdout

    r = simulate(
        cfg, "--device", "1002", "--mqtt", f"127.0.0.1:{broker.port}", "--key", "down", state=state
    )
    assert r.returncode == 0, r.stderr

    r = simulate(
        cfg,
        "--many",
        "20",
        "--rate",
        "40",
        "--duration",
        "2",
        "--heartbeat",
        "1",
        "--mqtt",
        f"127.0.0.1:{broker.port}",
        state=state,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    load = json.loads(r.stdout)
    assert load["presses"] > 0
    assert load["not_acknowledged"] == 0

    assert daemon.stop() == 0
    daemon.wait_for("gateway stopped")
    rows = journal(tmp_path / "gateway.db")
    assert rows[0] == (1001, 1, "key", 1, "serial:bus1")
    assert rows[1] == (1002, 1, "key", 4, "mqtt")
    presses = [r for r in rows[2:] if r[2] == "key"]
    assert len(presses) == load["presses"]  # each acknowledged press exactly once
    assert len({(r[0], r[1]) for r in rows}) == len(rows)


def test_kill_9_loses_no_acknowledged_press(tmp_path, pty_pair: PtyPair, daemon_factory):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    state = tmp_path / "sim"
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    for device in ("1005", "1006"):
        r = simulate(
            cfg,
            "--device",
            device,
            "--serial",
            str(pty_pair.device_port),
            "--key",
            "call",
            state=state,
        )
        assert r.returncode == 0, r.stderr
    daemon.stop(signal.SIGKILL)

    restarted = Daemon(cfg)
    daemon_factory.append(restarted)
    restarted.wait_for("gateway ready")
    r = simulate(
        cfg, "--device", "1005", "--serial", str(pty_pair.device_port), "--key", "up", state=state
    )
    assert r.returncode == 0, r.stderr
    assert restarted.stop() == 0
    rows = journal(tmp_path / "gateway.db")
    assert [(d, k) for d, _c, _kind, k, _l in rows] == [(1005, 1), (1006, 1), (1005, 3)]


def test_killed_gateway_is_reported_offline_by_its_last_will(
    tmp_path, broker: Broker, daemon_factory
):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="will9")
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    daemon.stop(signal.SIGKILL)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import asyncio, aiomqtt
async def main():
    async with aiomqtt.Client("127.0.0.1", {broker.port}) as c:
        await c.subscribe("onetouch/will9/gateway/status", qos=1)
        async for m in c.messages:
            if m.payload == b"offline":
                print("offline"); return
asyncio.run(asyncio.wait_for(main(), 20))
""",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "offline", out.stderr


def test_simulator_says_clearly_when_nobody_answers(tmp_path, pty_pair: PtyPair):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    r = simulate(
        cfg,
        "--device",
        "1001",
        "--serial",
        str(pty_pair.device_port),
        "--key",
        "call",
        "--timeout",
        "2",
        state=tmp_path / "sim",
    )
    assert r.returncode == 1
    assert "NOT acknowledged" in r.stderr


def test_broken_config_is_refused_with_file_field_and_value(tmp_path):
    bad = tmp_path / "gateway.toml"
    bad.write_text(
        '[village]\nid = "Bad Village!"\nzone = "Mars/Olympus"\n\n[links.mqtt]\nport = 70000\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"{bad}: village.id:" in r.stderr
    assert "'Bad Village!'" in r.stderr
    assert "village.zone: unknown field (misspelt?)" in r.stderr
    assert "links.mqtt.port:" in r.stderr
    assert "70000" in r.stderr
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 78  # EX_CONFIG: systemd must not restart-loop on it
    assert "village.id" in run.stderr

    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check-config",
            "--config",
            str(REPO / "config" / "gateway.toml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0, good.stderr
    assert "callers: 36" in good.stdout


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONETOUCH_CONFIG", raising=False)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def test_check_config_proves_coverage(tmp_path):
    (tmp_path / "people.toml").write_text((REPO / "config" / "people.toml").read_text())
    roster = (REPO / "config" / "roster.toml").read_text()
    # Nobody at night: the deputy's night shift is taken out.
    roster = roster.replace('start = "21:30"\nend = "07:30"\nperson = "li-fushuji"',
                            'start = "21:30"\nend = "22:30"\nperson = "li-fushuji"')
    roster = roster.replace('start = "00:00"\nend = "24:00"\nrole = "grid_leader"',
                            'start = "08:00"\nend = "20:00"\nrole = "grid_leader"')
    assert "22:30" in roster
    assert '"20:00"\nrole = "grid_leader"' in roster
    (tmp_path / "roster.toml").write_text(roster)
    gateway = (REPO / "config" / "gateway.toml").read_text().replace(
        'residents = "residents.toml"', f'residents = "{REPO / "config" / "residents.toml"}"'
    )
    (tmp_path / "gateway.toml").write_text(gateway)
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config",
         str(tmp_path / "gateway.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1, r.stdout
    assert str(tmp_path / "roster.toml") in r.stderr
    assert "22:30" in r.stderr, r.stderr


def test_sigterm_during_a_burst_loses_nothing(tmp_path, broker: Broker, daemon_factory):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="burst")
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    load = subprocess.Popen(
        [sys.executable, "-m", "simulators.caller", "--config", str(cfg),
         "--state-dir", str(tmp_path / "sim"), "--many", "30", "--rate", "60",
         "--duration", "4", "--heartbeat", "0", "--timeout", "40",
         "--mqtt", f"127.0.0.1:{broker.port}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.5)
    assert daemon.stop(signal.SIGTERM) == 0  # mid-burst
    daemon.wait_for("gateway stopped")
    restarted = Daemon(cfg)
    daemon_factory.append(restarted)
    restarted.wait_for("gateway ready")
    out, err = load.communicate(timeout=90)
    assert load.returncode == 0, out + err
    summary = json.loads(out)
    assert restarted.stop() == 0
    rows = journal(tmp_path / "gateway.db")
    presses = [(d, c) for d, c, kind, _k, _l in rows if kind == "key"]
    # Every press was acknowledged in the end (the callers repeated what the
    # stopping gateway had not acknowledged) and is stored exactly once.
    assert summary["not_acknowledged"] == 0
    assert len(presses) == summary["presses"]
    assert len(set(presses)) == len(presses)
