"""systemd/install.sh, run for real into a scratch folder: what IT staff run on the Pi.

It creates a system user, so it needs root (CI runs as root); the user and
the folder are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import IN_CI, REPO, Broker, require_binary

pytestmark = pytest.mark.e2e

USER = "onetouch-test"


@pytest.fixture
def scratch() -> Iterator[Path]:
    if os.geteuid() != 0:
        message = "the installer creates a system user: run the tests as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # The service user must be able to reach its files, so not under pytest's
    # private (0700) temporary folder.
    base = Path(tempfile.mkdtemp(prefix="onetouch-install-", dir="/tmp"))
    base.chmod(0o755)
    (base / "mosquitto-conf.d").mkdir()
    yield base
    subprocess.run(["userdel", USER], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)


def _install(base: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ONETOUCH_PREFIX": str(base / "opt"),
        "ONETOUCH_CONF": str(base / "etc"),
        "ONETOUCH_STATE": str(base / "state"),
        "ONETOUCH_USER": USER,
        "ONETOUCH_UNIT": str(base / "onetouch-gateway.service"),
        "ONETOUCH_BIN_LINK": str(base / "onetouch-gateway"),
        "ONETOUCH_MOSQUITTO_CONF_D": str(base / "mosquitto-conf.d"),
        "ONETOUCH_START": "no",
    }
    return subprocess.run(
        ["bash", str(REPO / "systemd" / "install.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_install_then_upgrade_keeps_edited_settings_and_the_service_runs(
    scratch: Path, broker: Broker
):
    first = _install(scratch)
    assert first.returncode == 0, first.stdout + first.stderr
    for n in range(1, 7):
        assert f"{n}/6" in first.stdout
    assert "OK:" in first.stdout  # check-config, run as the service user

    groups = subprocess.run(["id", "-nG", USER], capture_output=True, text=True, check=True)
    assert "dialout" in groups.stdout.split()  # serial ports and the modem
    conf, state = scratch / "etc", scratch / "state"
    for name in ("gateway.toml", "residents.toml", "people.toml", "roster.toml"):
        st = (conf / name).stat()
        assert st.st_mode & 0o777 == 0o640, name  # residents' names and phone numbers
        assert st.st_uid == 0
    assert state.owner() == USER
    assert str(state / "gateway.db") in (conf / "gateway.toml").read_text()
    unit = (scratch / "onetouch-gateway.service").read_text()
    binary = scratch / "opt" / "venv" / "bin" / "onetouch-gateway"
    assert f"ExecStart={binary} run --config {conf / 'gateway.toml'}" in unit
    assert f"User={USER}" in unit
    assert (scratch / "onetouch-gateway").resolve() == binary.resolve()
    analyze = require_binary("systemd-analyze", "systemd")
    verify = subprocess.run([analyze, "verify", str(scratch / "onetouch-gateway.service")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr

    # IT staff edit their residents; an upgrade runs the installer again.
    residents = conf / "residents.toml"
    edited = residents.read_text() + "\n# edited for this village\n"
    residents.write_text(edited)
    again = _install(scratch)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"kept      {residents}" in again.stdout
    assert residents.read_text() == edited

    # The installed program runs as the service user on the installed settings
    # (the example's serial port is absent here: the gateway starts without it).
    gateway_toml = conf / "gateway.toml"
    gateway_toml.write_text(
        gateway_toml.read_text().replace("port = 1883", f"port = {broker.port}")
        .replace("port = 9464", "port = 0")
    )
    daemon = subprocess.Popen(
        [str(binary), "run", "--config", str(gateway_toml)],
        user=USER,
        group=USER,
        extra_groups=["dialout"],
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            status = subprocess.run(
                [str(binary), "status", "--config", str(gateway_toml)],
                capture_output=True, text=True, timeout=60,
            )
            if status.returncode == 0:
                break
            assert daemon.poll() is None, daemon.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.5)
        assert status is not None
        assert status.returncode == 0, status.stdout + status.stderr
        assert "gateway RUNNING" in status.stdout
        assert "mqtt up" in status.stdout
        assert (state / "gateway.db").owner() == USER
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert daemon.returncode == 0
