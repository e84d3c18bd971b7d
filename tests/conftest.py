"""Fixtures with real parts: a mosquitto per session, socat pseudo-terminal pairs,
SQLite files in a temporary folder, and the gateway configured to use them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str, package: str) -> str:
    """The path of a program the tests need; a failure under CI, a skip elsewhere."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        message = f"{name} is not installed (apt-get install {package})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class Broker:
    """A private mosquitto on a free port; ``restart()`` keeps port and persistence."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 100000\n"
        )
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.log").open("ab"),
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(require_binary("mosquitto", "mosquitto"), tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that stop and restart it."""
    b = Broker(require_binary("mosquitto", "mosquitto"), tmp_path / "mq")
    b.workdir.mkdir()
    b.start()
    yield b
    b.stop()


@dataclass
class PtyPair:
    """Two linked pseudo-terminals: the gateway opens one, the callers the other.

    Stopping it makes both ports vanish, as when a USB adapter is pulled out.
    """

    binary: str
    gateway_port: Path
    device_port: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"pty,raw,echo=0,link={self.gateway_port}",
                f"pty,raw,echo=0,link={self.device_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (self.gateway_port.exists() and self.device_port.exists()):
            if time.monotonic() > deadline:
                raise TimeoutError("socat did not create the pty pair")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None
        deadline = time.monotonic() + 5
        while self.gateway_port.exists() or self.device_port.exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(require_binary("socat", "socat"), tmp_path / "ttyGW", tmp_path / "ttyDEV")
    pair.start()
    yield pair
    pair.stop()


def write_config(
    directory: Path,
    *,
    serial_port: Path | None = None,
    mqtt_port: int | None = None,
    village: str = "testvillage",
    residents: Path = REPO / "config" / "residents.toml",
) -> Path:
    """A gateway.toml for tests: fast reconnects, trusted clock, JSON logs."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (
        f'[village]\nid = "{village}"\nname = "测试村"\n\n'
        f'[store]\npath = "{directory / "gateway.db"}"\n\n'
        f'[files]\nresidents = "{residents}"\npeople = "{REPO / "config" / "people.toml"}"\n'
        f'roster = "{REPO / "config" / "roster.toml"}"\n\n'
        '[clock]\ntrust = "always"\n\n[log]\nformat = "json"\nlevel = "debug"\n\n'
    )
    if serial_port is not None:
        text += (
            f'[[links.serial]]\nname = "bus1"\nport = "{serial_port}"\n'
            "reopen_min_s = 0.1\nreopen_max_s = 0.5\n\n"
        )
    if mqtt_port is not None:
        text += (
            f'[links.mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
            f'client_id = "gw-{village}-{directory.name}"\n'
            "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\nkeepalive_s = 5\n"
        )
    path = directory / "gateway.toml"
    path.write_text(text)
    return path
