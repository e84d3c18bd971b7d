"""A caller written in C from firmware_protocol/SPEC.md alone, against the real gateway.

The C program (caller.c beside this file) knows nothing of the Python code: if it
interoperates with the daemon, the specification is complete enough to build a caller.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import sqlite3
import subprocess
import termios
import time
import tomllib
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO, PtyPair, require_binary, write_config
from ..e2e.conftest import Daemon

HERE = Path(__file__).resolve().parent
RESIDENTS = REPO / "config" / "residents.toml"
ZERO_KEY = "00" * 16
SPEC_KEY = bytes(range(16))  # the test key of SPEC.md section 12


# --- building the C caller ----------------------------------------------------------


@pytest.fixture(scope="module")
def caller_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = require_binary("gcc", "gcc")
    out = tmp_path_factory.mktemp("caller") / "caller"
    r = subprocess.run(
        [
            gcc,
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O2",
            "-o",
            str(out),
            str(HERE / "caller.c"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return out


def run_caller(
    binary: Path, port: Path, device: int, key_hex: str, key: str, counter: int
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), str(port), str(device), key_hex, key, str(counter)],
        capture_output=True,
        text=True,
        timeout=40,
    )


def resident_key(device: int) -> str:
    with RESIDENTS.open("rb") as f:
        callers = tomllib.load(f)["caller"]
    return next(str(c["key"]) for c in callers if c["id"] == device)


# --- the daemon ----------------------------------------------------------------------


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def journal(db: Path) -> list[tuple[int, int, str, int | None]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT device_id, counter, kind, key FROM events ORDER BY id"
        ).fetchall()


# --- tests ---------------------------------------------------------------------------


def test_selftest_reproduces_every_worked_example(caller_bin: Path):
    r = subprocess.run([str(caller_bin), "selftest"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    for n in range(1, 7):
        assert f"OK   example {n}" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["/dev/null", "1001", "00" * 16, "call"],
        ["/dev/null", "0", "00" * 16, "call", "1"],
        ["/dev/null", "1001", "00" * 15, "call", "1"],
        ["/dev/null", "1001", "zz" * 16, "call", "1"],
        ["/dev/null", "1001", "00" * 16, "help", "1"],
        ["/dev/null", "1001", "00" * 16, "call", "0"],
        ["/dev/null", "1001", "00" * 16, "call", "4294967296"],
    ],
)
def test_usage_errors_exit_2(caller_bin: Path, args: list[str]):
    r = subprocess.run([str(caller_bin), *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2
    assert "usage" in r.stderr


@pytest.mark.e2e
def test_c_caller_against_the_gateway_daemon(
    tmp_path: Path, pty_pair: PtyPair, daemons: list[Daemon], caller_bin: Path
):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    db = tmp_path / "gateway.db"
    key = resident_key(1001)

    def start() -> Daemon:
        d = Daemon(cfg)
        daemons.append(d)
        d.wait_for("gateway ready")
        return d

    # 1. green key, counter 1
    daemon = start()
    r = run_caller(caller_bin, pty_pair.device_port, 1001, key, "call", 1)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("ACK counter=1 ") for line in r.stdout.splitlines()), r.stdout
    assert daemon.stop() == 0
    assert journal(db) == [(1001, 1, "key", 1)]

    # 2. thumbs down, counter 2 (the gateway restarted in between: its marks persist)
    daemon = start()
    r = run_caller(caller_bin, pty_pair.device_port, 1001, key, "down", 2)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("ACK counter=2 ") for line in r.stdout.splitlines()), r.stdout
    assert daemon.stop() == 0
    assert journal(db) == [(1001, 1, "key", 1), (1001, 2, "key", 4)]

    # 3. the wrong key: never acknowledged, nothing stored
    daemon = start()
    started = time.monotonic()
    r = run_caller(caller_bin, pty_pair.device_port, 1001, ZERO_KEY, "call", 3)
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no ACK" in r.stderr
    assert "ACK counter" not in r.stdout
    assert 9.5 <= elapsed <= 15, elapsed
    rejected = [e for e in daemon.events() if e.get("event") == "frame rejected"]
    assert daemon.stop() == 0
    assert journal(db) == [(1001, 1, "key", 1), (1001, 2, "key", 4)]
    assert rejected, "the gateway logged no rejection for the wrong key"
    assert {e.get("reason") for e in rejected} == {"bad_mac"}


# --- a scripted gateway, built from the spec, for what the daemon does not send -------


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def frame(ftype: int, device: int, counter: int, payload: bytes, key: bytes) -> bytes:
    body = bytes([1, ftype]) + device.to_bytes(4, "big") + counter.to_bytes(4, "big")
    body += bytes([len(payload)]) + payload
    mac = hmac.new(key, body, hashlib.sha256).digest()[:8]
    return b"\xa5\x5a" + body + mac + crc16(body + mac).to_bytes(2, "big")


def ack(counter: int, acked: int, key: bytes = SPEC_KEY, device: int = 1001) -> bytes:
    return frame(0x81, device, counter, acked.to_bytes(4, "big") + b"\x00", key)


def feedback(counter: int, payload: bytes, key: bytes = SPEC_KEY, device: int = 1001) -> bytes:
    return frame(0x82, device, counter, payload, key)


HELP_COMING = bytes([2, 1, 1, 1, 0, 0])
ON_SITE = bytes([3, 4, 1, 1, 0, 0])


class Line:
    """The gateway's end of the pty pair, read frame by frame."""

    def __init__(self, port: Path) -> None:
        self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        self.buf = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def frame(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            start = self.buf.find(b"\xa5\x5a")
            if start >= 0:
                self.buf = self.buf[start:]
                if len(self.buf) >= 13 and len(self.buf) >= 23 + self.buf[12]:
                    n = 23 + self.buf[12]
                    out, self.buf = self.buf[:n], self.buf[n:]
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                self.buf += os.read(self.fd, 256)

    def close(self) -> None:
        os.close(self.fd)


def test_frame_builder_of_this_test_matches_spec_example_1():
    assert frame(0x01, 1001, 1, b"\x01", SPEC_KEY) == bytes.fromhex(
        "a55a0101000003e90000000101 01e0b6dc63cb577f3b514b".replace(" ", "")
    )


def test_feedback_while_pending_waits_for_the_ack(
    tmp_path: Path, pty_pair: PtyPair, caller_bin: Path
):
    """Rule 3 of 10.2, replay protection and the receive checks, against a scripted peer."""
    line = Line(pty_pair.gateway_port)
    proc = subprocess.Popen(
        [str(caller_bin), str(pty_pair.device_port), "1001", SPEC_KEY.hex(), "call", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CALLER_LINGER_S": "1.5"},
    )
    try:
        key_frame = frame(0x01, 1001, 5, b"\x01", SPEC_KEY)
        first = line.frame(3)
        t0 = time.monotonic()
        assert first == key_frame

        # noise the caller must ignore, then a FEEDBACK it must remember but not answer yet
        bad_crc = bytearray(ack(20, 5))
        bad_crc[17] ^= 0x01
        line.send(
            b"\x00\x13\xa5"
            + bytes(bad_crc)
            + ack(21, 5, device=1002)  # another caller's ACK
            + ack(22, 5, key=bytes(16))  # bad MAC
            + key_frame  # an uplink frame (its own echo)
            + ack(9, 4)  # accepted (raises the mark to 9) but names no pending counter
            + feedback(10, HELP_COMING)
        )
        repeat = line.frame(4)
        t1 = time.monotonic()
        assert repeat == key_frame, "expected the byte-identical repeat, not a CALLER_ACK"
        assert 1.2 <= t1 - t0 <= 2.3, t1 - t0  # 1.0 s timeout + 0.5..0.75 s back-off

        # a replayed ACK (downlink counter 10, not above the mark of 10) must not complete it
        line.send(ack(10, 5))
        repeat = line.frame(5)
        t2 = time.monotonic()
        assert repeat == key_frame
        assert 1.7 <= t2 - t1 <= 2.8, t2 - t1  # 1.0 s + 1.0..1.5 s

        # a newer FEEDBACK, then the real ACK: one CALLER_ACK, for the newest FEEDBACK only
        line.send(feedback(30, ON_SITE) + ack(31, 5))
        assert line.frame(2) == frame(0x03, 1001, 6, (30).to_bytes(4, "big"), SPEC_KEY)

        # nothing pending now: a FEEDBACK is answered at once, with the next counter
        line.send(feedback(32, ON_SITE))
        assert line.frame(2) == frame(0x03, 1001, 7, (32).to_bytes(4, "big"), SPEC_KEY)

        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert "ACK counter=5 downlink_counter=31 status=0" in lines
        assert "CALLER_ACK counter=6 acked_counter=30" in lines
        assert "CALLER_ACK counter=7 acked_counter=32" in lines
        fb = [x for x in lines if x.startswith("FEEDBACK")]
        assert [x.split()[1] for x in fb] == [
            "downlink_counter=10",
            "downlink_counter=30",
            "downlink_counter=32",
        ]
        assert "state=HELP_COMING" in fb[0]
        assert "state=ON_SITE" in fb[1]
        assert "buzzer not replayed" in fb[2]
        assert line.frame(0.3) is None  # and nothing else was sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        line.close()
