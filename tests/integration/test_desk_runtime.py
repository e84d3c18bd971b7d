"""The desk inside the running gateway: feedback on the caller, channels, answers."""

from __future__ import annotations

import asyncio
import json

import aiomqtt

from firmware_protocol import CallerState, Key
from gateway.events import PersonAnswered
from simulators.caller import CounterFile, SerialBus, SimCaller

from ..conftest import Broker, PtyPair, write_config
from ..e2e.village_short import write_short_village
from .helpers import caller_key, running_gateway, wait_until

DEV = 1007


async def _app_messages(port: int, prefix: str, out: list[tuple[str, dict]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{prefix}/app/+/notify", qos=1)
        async for m in client.messages:
            out.append((str(m.topic).split("/")[-2], json.loads(m.payload)))  # type: ignore[arg-type]


async def test_green_lights_received_then_help_coming(tmp_path, pty_pair: PtyPair, broker: Broker):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="fb"
    )
    write_short_village(tmp_path, cfg)
    apps: list[tuple[str, dict]] = []
    listener = asyncio.create_task(_app_messages(broker.port, "onetouch/fb", apps))
    await asyncio.sleep(0.3)
    try:
        async with running_gateway(cfg) as gw:
            bus = SerialBus(str(pty_pair.device_port))
            caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
            bus.callers[DEV] = caller
            async with bus:
                assert (await caller.press(Key.CALL, give_up_s=5)).acked
                await wait_until(
                    lambda: caller.state is CallerState.RECEIVED, what="the caller to show RECEIVED"
                )
                await wait_until(
                    lambda: any(a == "app-a" for a, _ in apps),
                    what="the secretary's app to be told",
                )
                message = next(m for a, m in apps if a == "app-a")
                assert message["case_id"] == f"{DEV}-1"
                assert message["kind"] == "call"
                assert gw.intake is not None
                gw.intake.submit_event(PersonAnswered("a", f"{DEV}-1", "accept"))
                await wait_until(
                    lambda: caller.state is CallerState.HELP_COMING,
                    what="the caller to show HELP_COMING",
                )
            assert gw.store is not None
            case = await gw.store.case(f"{DEV}-1")
    finally:
        listener.cancel()
    assert case is not None
    assert case.state.value == "accepted"
    assert case.accepted_by == "a"


async def test_app_offline_falls_through_at_once(tmp_path, pty_pair: PtyPair, broker: Broker):
    """A channel that fails at once moves on at once: no timeout waited for nobody."""
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="off"
    )
    write_short_village(tmp_path, cfg, first=60.0)
    async with aiomqtt.Client("127.0.0.1", broker.port) as app_a:
        await app_a.publish("onetouch/off/app/app-a/status", b"offline", qos=1, retain=True)
    apps: list[tuple[str, dict]] = []
    listener = asyncio.create_task(_app_messages(broker.port, "onetouch/off", apps))
    await asyncio.sleep(0.3)
    try:
        async with running_gateway(cfg) as gw:
            await wait_until(
                lambda: "app-a" in gw.dispatcher._channels["app"].status,  # type: ignore[union-attr]
                what="the app status to arrive",
            )
            bus = SerialBus(str(pty_pair.device_port))
            caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
            bus.callers[DEV] = caller
            async with bus:
                assert (await caller.press(Key.CALL, give_up_s=5)).acked
                # Person a's only channel is down: b is called well before a's 60 s.
                await wait_until(
                    lambda: any(a == "app-b" for a, _ in apps),
                    timeout=10,
                    what="the second person to be called",
                )
            assert gw.store is not None
            tried = await gw.store.notifications(f"{DEV}-1")
    finally:
        listener.cancel()
        async with aiomqtt.Client("127.0.0.1", broker.port) as app_a:
            await app_a.publish("onetouch/off/app/app-a/status", b"", qos=1, retain=True)
    assert [(t["person_id"], t["outcome"]) for t in tried][:2] == [("a", "failed"), ("b", "sent")]
    assert "offline" in tried[0]["detail"]
    assert not any(a == "app-a" for a, _ in apps)
