"""The daemon speaks systemd's notify protocol to a socket the test owns."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

from gateway.config import load
from gateway.metrics import Metrics
from gateway.runtime import Gateway
from gateway.sdnotify import Notifier

from ..conftest import PtyPair, write_config


class NotifySocket:
    """A Unix datagram socket like systemd's, recording what arrives and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def times(self, key: str) -> list[float]:
        return [t for t, f in self.received if key in f]


async def test_ready_status_watchdog_and_a_blocked_loop(tmp_path, pty_pair: PtyPair):
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
    gateway = Gateway(load(write_config(tmp_path, serial_port=pty_pair.gateway_port)),
                      metrics=Metrics(), notifier=Notifier(env))
    task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.ready.wait(), 15)
        await asyncio.sleep(1.0)
        assert notify.times("READY"), notify.received
        ready = next(f for _, f in notify.received if "READY" in f)
        assert "links up: serial:bus1" in ready["STATUS"]
        assert len(notify.times("WATCHDOG")) >= 3

        blocked_from = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251 -- the point: a hung event loop
        blocked_to = time.monotonic()
        await asyncio.sleep(0.6)
        during = [t for t in notify.times("WATCHDOG") if blocked_from + 0.05 < t < blocked_to]
        after = [t for t in notify.times("WATCHDOG") if t > blocked_to]
        assert during == []
        assert after  # pings resume once the loop runs again
    finally:
        gateway.stop_requested.set()
        await asyncio.wait_for(task, 15)
        await asyncio.sleep(0.2)
        notify.close()
    assert any(f.get("STOPPING") == "1" for _, f in notify.received)


def test_notifier_without_socket_is_silent():
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert n.notify(ready=1) is False


def test_watchdog_for_another_pid_is_ignored():
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None
