"""SIGHUP re-reads the configuration; a bad file is refused and the old one serves on."""

from __future__ import annotations

import signal
import time

import pytest

from ..conftest import Broker, PtyPair, write_config
from .conftest import Daemon, simulate
from .test_escalation import AppListener
from .village_short import write_short_village

pytestmark = pytest.mark.e2e


def _wait_line(daemon: Daemon, event: str, after: int) -> dict[str, object]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = daemon.events()[after:]
        for e in events:
            if e.get("event") == event:
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} after line {after}: {''.join(daemon.lines[after:])}")


def test_sighup_with_a_bad_then_a_good_roster(tmp_path, pty_pair: PtyPair, broker: Broker,
                                               daemon_factory):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port,
                       village="hup")
    write_short_village(tmp_path, cfg, first=60.0, second=60.0)
    roster = tmp_path / "roster.toml"
    good = roster.read_text()
    apps = AppListener(broker.port, "onetouch/hup")
    try:
        daemon = Daemon(cfg)
        daemon_factory.append(daemon)
        daemon.wait_for("gateway ready")

        roster.write_text(good.replace('person = "a"\n', 'person = "nobody"\n', 1))
        mark = len(daemon.events())
        daemon.proc.send_signal(signal.SIGHUP)
        refused = _wait_line(daemon, "configuration NOT reloaded; the running one stays", mark)
        assert "nobody" in str(refused["problem"])
        # The old roster still answers: person a is called first.
        r = simulate(cfg, "--device", "1001", "--serial", str(pty_pair.device_port),
                     "--key", "call", state=tmp_path / "sim")
        assert r.returncode == 0, r.stderr
        apps.wait_for("app-a")

        # Now a good change: b answers first.
        first_step = '[[escalation.step]]\nperson = "a"'
        assert first_step in good
        roster.write_text(good.replace(first_step, '[[escalation.step]]\nperson = "b"', 1))
        mark = len(daemon.events())
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_line(daemon, "configuration reloaded", mark)
        r = simulate(cfg, "--device", "1002", "--serial", str(pty_pair.device_port),
                     "--key", "call", state=tmp_path / "sim")
        assert r.returncode == 0, r.stderr
        apps.wait_for("app-b")
        calls_b = [p for _t, app, p in apps.received if app == "app-b" and p["kind"] == "call"]
        assert [p["case_id"] for p in calls_b] == ["1002-1"]

        # A change the running gateway cannot take is named, not ignored.
        text = cfg.read_text()
        assert 'trust = "always"' in text
        cfg.write_text(text.replace('trust = "always"', 'trust = "never"'))
        mark = len(daemon.events())
        daemon.proc.send_signal(signal.SIGHUP)
        later = _wait_line(daemon, "these settings take effect at the next restart", mark)
        assert later["sections"] == ["clock"]
        assert daemon.stop() == 0
    finally:
        apps.close()
