"""The interactive caller: keys on a terminal, the LED the gateway commands."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from ..conftest import REPO, Broker, write_config
from .conftest import Daemon

pytestmark = pytest.mark.e2e


class Terminal:
    """What a program wrote to its terminal so far; waits look at all of it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = ""

    def wait_for(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {needle!r}; terminal showed:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        if needle not in self.seen:
            raise AssertionError(f"never saw {needle!r}; terminal showed:\n{self.seen}")


def test_keys_on_a_terminal_reach_the_gateway_and_the_led_follows(
    tmp_path, broker: Broker, daemon_factory
):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="tty")
    daemon = Daemon(cfg)
    daemon_factory.append(daemon)
    daemon.wait_for("gateway ready")
    controller, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.caller", "--config", str(cfg), "--device", "1010",
         "--mqtt", f"127.0.0.1:{broker.port}", "--interactive",
         "--state-dir", str(tmp_path / "sim")],
        cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )
    os.close(terminal)
    try:
        screen = Terminal(controller)
        screen.wait_for("q = quit")
        os.write(controller, b"g")
        screen.wait_for("call acknowledged")
        # The desk lights the caller: received, the gateway is finding someone.
        screen.wait_for("LED amber")
        os.write(controller, b"q")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    assert daemon.stop() == 0
