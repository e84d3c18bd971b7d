"""Issue 3 end to end: a press nobody answers escalates, and a kill -9 in the
middle of the wait does not reset or lose the escalation."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ..conftest import Broker, PtyPair, write_config
from .conftest import Daemon, simulate
from .village_short import write_short_village

pytestmark = pytest.mark.e2e


class AppListener:
    """Plays the secretary apps: records every notification pushed to them."""

    def __init__(self, port: int, prefix: str) -> None:
        self.received: list[tuple[float, str, dict[str, object]]] = []
        code = (
            "import asyncio, aiomqtt, json, sys, time\n"
            "async def main():\n"
            f"    async with aiomqtt.Client('127.0.0.1', {port}) as c:\n"
            f"        await c.subscribe('{prefix}/app/+/notify', qos=1)\n"
            "        print('subscribed', flush=True)\n"
            "        async for m in c.messages:\n"
            "            print(json.dumps([time.monotonic(), str(m.topic), "
            "json.loads(m.payload)]), flush=True)\n"
            "asyncio.run(main())\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "subscribed"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, topic, payload = json.loads(line)
            self.received.append((t, topic.split("/")[-2], payload))

    def wait_for(self, app_id: str, kind: str = "call", timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, app, payload in self.received:
                if app == app_id and payload["kind"] == kind:
                    return t
            time.sleep(0.05)
        raise AssertionError(f"{app_id} was never sent a {kind!r}: {self.received}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _cases(db: Path) -> list[dict[str, object]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [json.loads(r[0]) for r in conn.execute("SELECT data FROM cases")]


def test_unanswered_call_escalates_on_time_across_a_kill_9(
    tmp_path, pty_pair: PtyPair, broker: Broker, daemon_factory
):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port,
                       village="esc9")
    write_short_village(tmp_path, cfg, first=10.0, second=10.0)
    apps = AppListener(broker.port, "onetouch/esc9")
    try:
        daemon = Daemon(cfg)
        daemon_factory.append(daemon)
        daemon.wait_for("gateway ready")
        r = simulate(cfg, "--device", "1001", "--serial", str(pty_pair.device_port),
                     "--key", "call", state=tmp_path / "sim")
        assert r.returncode == 0, r.stderr
        called_a = apps.wait_for("app-a")

        time.sleep(4.0)  # in the middle of the first person's 10 s
        daemon.stop(signal.SIGKILL)
        restarted = Daemon(cfg)
        daemon_factory.append(restarted)
        restarted.wait_for("gateway ready")
        restarted.wait_for("cases restored")

        called_b = apps.wait_for("app-b")
        waited = called_b - called_a
        # The second person is called when the first one's 10 s are up: not
        # earlier (the restart did not skip the wait) and not a whole new
        # timeout later (the restart did not restart the wait).
        assert 9.5 <= waited < 15.0, f"second person called after {waited:.1f} s"
        assert restarted.stop() == 0
    finally:
        apps.close()

    (case,) = _cases(tmp_path / "gateway.db")
    assert case["id"] == "1001-1"
    assert case["state"] == "notifying"
    assert case["current"] == "b"
    assert case["notified"] == ["a", "b"]
    causes = [t["cause"] for t in case["transitions"]]
    assert causes[0] == "green"
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        presses = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'key'").fetchone()[0]
        outbox = conn.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'case'").fetchone()[0]
        sent = conn.execute(
            "SELECT person_id, channel, outcome FROM notifications ORDER BY id"
        ).fetchall()
    assert presses == 1
    assert outbox >= 2  # opened, then passed to the second person
    assert sent[:2] == [("a", "app", "sent"), ("b", "app", "sent")]
