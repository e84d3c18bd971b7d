"""Fault campaign: the wall clock jumps forwards and backwards mid-escalation.

A Pi without an RTC boots with a wrong wall clock and NTP later moves it by
hours, either way.  The gateway reads wall time only through
``gateway.clock.WallClock.now`` (patched here to add an offset that the test
moves), while the dispatcher arms its timers on the event loop's monotonic
clock.  So an escalation step armed before a jump must fire after its own
duration, measured on the monotonic clock: not early when the wall clock
leaps +3 h (no skipped deadline), not 3 h late when it falls back (no lost
deadline).  Presses keep being acknowledged and are journalled with the
(jumped) wall time they arrived at.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import pytest

from firmware_protocol import Key, KeyPress
from gateway.clock import WallClock

from ..conftest import Broker, write_config
from ..e2e.village_short import write_short_village
from ..integration.helpers import MqttDevice, frame, running_gateway, wait_until

DEV = 1004
FIRST = 10.0  # person a's ack timeout (the roster's minimum); then b is called
SECOND = 10.0  # person b's
JUMP = 3 * 3600.0
TOLERANCE = 2.0  # seconds a timer may be late on a busy 2-core machine


async def _listen(port: int, prefix: str, out: list[tuple[float, str, dict]]) -> None:
    loop = asyncio.get_running_loop()
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{prefix}/app/+/notify", qos=1)
        async for m in client.messages:
            payload = json.loads(m.payload)  # type: ignore[arg-type]
            out.append((loop.time(), str(m.topic).split("/")[-2], payload))


def _first(apps: list[tuple[float, str, dict]], app: str) -> float | None:
    return next((t for t, a, _p in apps if a == app), None)


async def test_deadlines_survive_wall_clock_jumps(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="clockjump")
    write_short_village(tmp_path, cfg, first=FIRST, second=SECOND)
    prefix = "onetouch/clockjump"
    offset = [0.0]
    real_time = time.time
    monkeypatch.setattr(WallClock, "now", lambda self: real_time() + offset[0])

    loop = asyncio.get_running_loop()
    apps: list[tuple[float, str, dict]] = []
    listener = asyncio.create_task(_listen(broker.port, prefix, apps))
    await asyncio.sleep(0.3)
    try:
        async with running_gateway(cfg) as gw, MqttDevice(broker.port, prefix) as dev:
            assert gw.store is not None
            pressed_at = loop.time()
            await dev.publish(DEV, frame(KeyPress(Key.CALL), DEV, 1))
            await dev.acks_for(DEV, 1)
            await wait_until(lambda: _first(apps, "app-a") is not None, what="a to be called")

            await asyncio.sleep(1.0)
            offset[0] = +JUMP  # NTP: "it is three hours later than you thought"
            jumped_fwd = real_time()
            await dev.publish(DEV, frame(KeyPress(Key.UP), DEV, 2))
            await dev.acks_for(DEV, 2)
            await asyncio.sleep(1.0)
            assert _first(apps, "app-b") is None, "the +3 h jump fired a deadline early"

            offset[0] = -JUMP  # and now three hours earlier
            jumped_back = real_time()
            await dev.publish(DEV, frame(KeyPress(Key.DOWN), DEV, 3))
            await dev.acks_for(DEV, 3)

            # a's step was armed before both jumps: b is called FIRST seconds
            # (monotonic) after the press, neither early nor three hours late.
            await wait_until(
                lambda: _first(apps, "app-b") is not None,
                timeout=FIRST + TOLERANCE,
                what="the escalation to b (a deadline lost to the jump?)",
            )
            b_at = _first(apps, "app-b")
            assert b_at is not None
            assert FIRST - 0.3 <= b_at - pressed_at <= FIRST + TOLERANCE, b_at - pressed_at

            # b's step was armed while the clock was 3 h behind: its timer is
            # due SECOND seconds from now on the monotonic clock, and the case
            # carries the matching (jumped) wall-clock deadline for a restart.
            handle = gw.dispatcher._timers[f"{DEV}-1"]  # type: ignore[union-attr]
            assert SECOND - TOLERANCE <= handle.when() - loop.time() <= SECOND, (
                handle.when() - loop.time()
            )
            b_armed_wall = real_time() - JUMP

            events = await gw.store.events(device_id=DEV)
            case = await gw.store.case(f"{DEV}-1")
            errors = {
                name: gw.metrics.get(name)
                for name in (
                    "gateway_desk_errors_total",
                    "gateway_intake_errors_total",
                    "gateway_store_errors_total",
                )
            }
    finally:
        listener.cancel()

    assert errors == dict.fromkeys(errors, 0.0)
    # Journalled with the wall time each press arrived at, jumps included.
    assert [(e.counter, getattr(e, "key", None)) for e in events] == [
        (1, Key.CALL),
        (2, Key.UP),
        (3, Key.DOWN),
    ]
    assert abs(events[1].received_at - (jumped_fwd + JUMP)) < 5
    assert abs(events[2].received_at - (jumped_back - JUMP)) < 5
    # Every step fired exactly once: no skipped and no doubled deadline.
    calls = [(a, p["kind"]) for _t, a, p in apps if a in ("app-a", "app-b")]
    assert calls.count(("app-a", "call")) == 1, calls
    assert calls.count(("app-b", "call")) == 1, calls
    assert case is not None
    assert case.open
    assert case.state.value == "notifying"
    assert case.current == "b"
    assert case.deadline is not None
    assert case.deadline.kind.value == "ack"
    assert abs(case.deadline.due_at - (b_armed_wall + SECOND)) < TOLERANCE + 1
