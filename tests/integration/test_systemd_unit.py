"""The shipped unit file is valid for systemd and asks for what the daemon does."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO, require_binary

UNIT = REPO / "systemd" / "onetouch-gateway.service"
INSTALLED_BINARY = "/opt/onetouch-gateway/venv/bin/onetouch-gateway"


def test_systemd_analyze_verify_passes(tmp_path: Path):
    analyze = require_binary("systemd-analyze", "systemd")
    # verify checks that ExecStart exists; point it at this checkout's entry point.
    local = Path(sys.executable).parent / "onetouch-gateway"
    assert local.exists(), "the package is not installed in this environment"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(local)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "onetouch-gateway.service" not in r.stderr, r.stderr


def test_unit_is_a_watched_notify_service():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert int(service["WatchdogSec"]) > 0
    assert service["RestartPreventExitStatus"] == "78"
    assert "ProtectClock" not in service  # it would hide whether NTP synced the clock
