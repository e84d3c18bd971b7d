"""The staff commands on a seeded database, with the daemon stopped and running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.events import PersonAnswered
from gateway.status import table, text_width
from simulators.caller import CounterFile, SerialBus, SimCaller

from ..conftest import REPO, Broker, PtyPair, write_config
from ..integration.helpers import caller_key, running_gateway, wait_until
from .conftest import Daemon
from .village_short import write_short_village

pytestmark = pytest.mark.e2e


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def seeded(tmp_path, pty_pair: PtyPair, broker: Broker) -> Path:
    """A database holding one accepted case (caller 1001) and one waiting (caller 1002)."""
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="staff"
    )
    write_short_village(tmp_path, cfg, first=600.0, second=600.0)
    async with running_gateway(cfg) as gw:
        bus = SerialBus(str(pty_pair.device_port))
        counters = CounterFile(tmp_path / "c.json")
        for device in (1001, 1002):
            bus.callers[device] = SimCaller(device, caller_key(device), counters, bus.send)
        async with bus:
            for device in (1001, 1002):
                assert (await bus.callers[device].press(bus_key(), give_up_s=5)).acked
            assert gw.intake is not None
            gw.intake.submit_event(PersonAnswered("a", "1001-1", "accept"))
            await wait_until(
                lambda: (
                    gw.desk.open_case(1001) is not None
                    and gw.desk.open_case(1001).accepted_by == "a"
                ),  # type: ignore[union-attr]
                what="the acceptance",
            )
    return cfg


def bus_key():  # the green key
    from firmware_protocol import Key

    return Key.CALL


def test_cases_lists_residents_and_tells_a_story(seeded: Path):
    r = cli(seeded, "cases")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["case", "resident", "address", "state"]
    row = next(line for line in lines if line.startswith("1001-1"))
    assert "accepted" in row
    assert "甲书记" in row  # who took it, by name
    # Columns line up although names are Chinese (two columns per character).
    header_state = text_width(lines[0][: lines[0].index("state")])
    assert text_width(row[: row.index("accepted")]) == header_state

    story = cli(seeded, "cases", "--case", "1001-1")
    assert story.returncode == 0, story.stderr
    assert "-> opened" in story.stdout or "opened" in story.stdout
    sent = next(line for line in story.stdout.splitlines() if "call to 甲书记 by app" in line)
    assert "sent" in sent

    data = json.loads(cli(seeded, "cases", "--open", "--json").stdout)
    assert {c["id"] for c in data} == {"1001-1", "1002-1"}


def test_status_when_not_running(seeded: Path):
    r = cli(seeded, "status")
    assert r.returncode == 3
    assert "gateway NOT RUNNING" in r.stdout
    assert "open cases: 2" in r.stdout
    data = json.loads(cli(seeded, "status", "--json").stdout)
    assert data["running"] is False
    assert len(data["open_cases"]) == 2


def test_status_while_running(seeded: Path, daemon_factory):
    daemon = Daemon(seeded)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    deadline_ok = False
    for _ in range(50):
        r = cli(seeded, "status")
        if r.returncode == 0:
            deadline_ok = True
            break
    assert deadline_ok, r.stdout + r.stderr
    assert "gateway RUNNING" in r.stdout
    assert "serial:bus1 up" in r.stdout
    assert "mqtt up" in r.stdout
    assert "on duty:  甲书记" in r.stdout
    assert daemon.stop() == 0


def test_roster_covers_seven_days(seeded: Path):
    r = cli(seeded, "roster")
    assert r.returncode == 0, r.stderr
    data = json.loads(cli(seeded, "roster", "--json").stdout)
    assert len({row["date"] for row in data}) == 7
    assert all(row["on_duty"] == ["a"] for row in data)
    assert "甲书记" in r.stdout


def test_table_aligns_chinese_text():
    out = table(["名字", "x"], [["王秀英", "1"], ["Li", "2"]]).splitlines()
    columns = [
        text_width(line[: line.index(mark)])
        for line, mark in zip([out[0], out[2], out[3]], ["x", "1", "2"], strict=True)
    ]
    assert columns == [8, 8, 8]  # 王秀英 is six columns wide, then two spaces


def _read_until(proc: subprocess.Popen[str], text: str, out: list[str], timeout: float) -> None:
    """Collect *proc*'s stdout lines until one contains *text*."""
    import threading

    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if text in line:
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), "".join(out)
    assert any(text in line for line in out), "".join(out)


def test_test_call_follows_a_real_press_to_the_acceptance(
    tmp_path, pty_pair: PtyPair, broker: Broker, daemon_factory
):
    from .conftest import simulate

    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="testcall"
    )
    write_short_village(tmp_path, cfg, first=600.0, second=600.0)

    # Not running yet: the command says so instead of waiting for nothing.
    r = cli(cfg, "test-call", "1001", "--timeout", "5")
    assert r.returncode == 1
    assert "not running" in r.stderr
    r = cli(cfg, "test-call", "4242", "--timeout", "5")
    assert r.returncode == 1
    assert "caller 4242 is not in" in r.stderr

    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    phones = subprocess.Popen(
        [sys.executable, "-m", "simulators.app", "--config", str(cfg),
         "--mqtt", f"127.0.0.1:{broker.port}", "--persona", "a=accept:0.5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    watch = None
    try:
        phone_out: list[str] = []
        _read_until(phones, "phones with the app", phone_out, 30)
        # The status file the command reads is written every few seconds.
        for _ in range(60):
            if cli(cfg, "status").returncode == 0:
                break
        watch = subprocess.Popen(
            [sys.executable, "-m", "gateway", "test-call", "1001", "--timeout", "90",
             "--config", str(cfg)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        out: list[str] = []
        _read_until(watch, "Press the GREEN key", out, 60)
        r = simulate(
            cfg, "--device", "1001", "--serial", str(pty_pair.device_port), "--key", "call",
            state=tmp_path / "sim",
        )
        assert r.returncode == 0, r.stderr
        assert watch.wait(120) == 0, "".join(out) + watch.stderr.read()  # type: ignore[union-attr]
    finally:
        for proc in (watch, phones):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    text = "".join(out)
    steps = [
        "green press received, stored and acknowledged",
        "case 1001-",
        "甲书记 by app: sent",
        "ACCEPTED by 甲书记",
        "TEST CALL PASSED",
    ]
    positions = [text.find(s) for s in steps]
    assert all(p >= 0 for p in positions), text
    assert positions == sorted(positions), text
    assert daemon.stop() == 0


def test_test_call_says_when_no_press_arrives(tmp_path, pty_pair: PtyPair, broker: Broker,
                                              daemon_factory):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="testcall2"
    )
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    for _ in range(60):
        if cli(cfg, "status").returncode == 0:
            break
    r = cli(cfg, "test-call", "1001", "--timeout", "2")
    assert r.returncode == 1
    assert "TEST CALL FAILED: no green press arrived" in r.stderr
    assert daemon.stop() == 0
