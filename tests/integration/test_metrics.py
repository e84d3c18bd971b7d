"""The Prometheus endpoint: real HTTP on loopback, figures that follow events."""

from __future__ import annotations

import asyncio
import os

from firmware_protocol import Key, KeyPress
from gateway.events import PersonAnswered

from ..conftest import Broker, PtyPair, write_config
from ..e2e.village_short import write_short_village
from .helpers import SerialDevice, frame, running_gateway, wait_until


async def _scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def _value(body: str, series: str) -> float:
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in:\n{body}")


async def test_metrics_follow_presses_rejections_cases_and_accepts(
    tmp_path, pty_pair: PtyPair, broker: Broker
):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="prom"
    )
    write_short_village(tmp_path, cfg, first=60.0)
    cfg.write_text(cfg.read_text() + "\n[metrics]\nport = 0\n")
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        port = gw.metrics_server.bound_port
        await dev.write(frame(KeyPress(Key.CALL), 1001, 1))
        await dev.acks_for(1001, 1)
        await dev.write(frame(KeyPress(Key.CALL), 1002, 1, key=os.urandom(16)))
        await wait_until(lambda: gw.desk.open_case(1001) is not None, what="the case")
        assert gw.intake is not None
        gw.intake.submit_event(PersonAnswered("a", "1001-1", "accept"))
        await wait_until(
            lambda: gw.desk.open_case(1001).accepted_by == "a",  # type: ignore[union-attr]
            what="the accept",
        )
        await wait_until(
            lambda: (
                gw.metrics.get("gateway_notifications_total", channel="app", outcome="sent") >= 1
            ),
            what="the app notification",
        )
        status, body = await _scrape(port)
        missing, _ = await _scrape(port, "/nothing")
    assert status == "HTTP/1.1 200 OK"
    assert missing == "HTTP/1.1 404 Not Found"
    assert _value(body, 'gateway_presses_total{key="call"}') == 1
    assert _value(body, 'gateway_rejected_frames_total{link="serial:bus1",reason="bad_mac"}') == 1
    assert _value(body, 'gateway_cases{state="accepted"}') == 1
    assert _value(body, 'gateway_notifications_total{channel="app",outcome="sent"}') >= 1
    assert _value(body, "gateway_time_to_accept_seconds_count") == 1
    assert _value(body, "gateway_backlog_records") >= 1
