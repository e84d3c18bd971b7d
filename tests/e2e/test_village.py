"""The README's first command: the simulated village starts, serves, and cleans up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import REPO, require_binary

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; only a running process is left behind.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pids(output: str) -> list[int]:
    started = next(line for line in output.splitlines() if "started mosquitto" in line)
    return [int(p) for p in re.findall(r"pid (\d+)", started)]


def test_village_runs_and_leaves_no_process(tmp_path):
    require_binary("mosquitto", "mosquitto")
    require_binary("socat", "socat")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.village",
            "--duration",
            "8",
            "--every",
            "0.5",
            "--seed",
            "7",
            "--workdir",
            str(tmp_path / "village"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-2])
    assert summary["cases"] >= 1
    assert summary["rated"] >= 1  # at least one full case: press, help, resolved, rating
    assert summary["not_acknowledged"] == 0
    assert "acknowledged in" in r.stdout
    assert "help coming" in r.stdout
    assert "is resolved" in r.stdout
    assert "district: case store committed" in r.stdout
    pids = _pids(r.stdout)
    assert len(pids) == 5  # broker, serial bus, modem, district store, gateway
    assert not [p for p in pids if _alive(p)]


def test_ctrl_c_stops_everything(tmp_path):
    require_binary("mosquitto", "mosquitto")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.village",
            "--every",
            "0.5",
            "--workdir",
            str(tmp_path / "village"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "acknowledged in" in line:
            break
    else:
        proc.kill()
        raise AssertionError("".join(lines))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "stopped mosquitto" in text
    assert not [p for p in _pids(text) if _alive(p)]
