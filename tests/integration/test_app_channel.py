"""The secretary app channel: signed answers close the loop; forged ones do nothing."""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt

from firmware_protocol import CallerState, Key
from gateway.config import load
from gateway.notify.app import sign_answer
from simulators.app import Phone, parse_persona
from simulators.caller import CounterFile, SerialBus, SimCaller

from ..conftest import Broker, PtyPair, write_config
from ..e2e.village_short import write_short_village
from .helpers import caller_key, running_gateway, wait_until

DEV = 1012


async def test_accept_arrive_resolve_from_the_app_then_thumbs_up(
    tmp_path, pty_pair: PtyPair, broker: Broker
):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="loop"
    )
    write_short_village(tmp_path, cfg)
    people = load(cfg).village.people
    said: list[str] = []
    phone = Phone(
        people["a"],
        parse_persona("accept:0.3,arrived:0.8,resolved:1.3"),
        "127.0.0.1",
        broker.port,
        "onetouch/loop",
        said.append,
    )
    phone_task = asyncio.create_task(phone.run())
    try:
        async with running_gateway(cfg) as gw:
            bus = SerialBus(str(pty_pair.device_port))
            states: list[CallerState] = []
            caller = SimCaller(
                DEV,
                caller_key(DEV),
                CounterFile(tmp_path / "c.json"),
                bus.send,
                on_feedback=lambda c, fb: states.append(fb.state),
            )
            bus.callers[DEV] = caller
            async with bus:
                assert (await caller.press(Key.CALL, give_up_s=5)).acked
                await wait_until(
                    lambda: CallerState.IDLE in states or len(states) >= 4,
                    timeout=10,
                    what="the case to be resolved on the caller",
                )
                assert (await caller.press(Key.UP, give_up_s=5)).acked
                await wait_until(
                    lambda: CallerState.THANKS in states, timeout=5, what="thanks for the rating"
                )
            assert gw.store is not None
            case = await gw.store.case(f"{DEV}-1")
    finally:
        phone_task.cancel()
    assert states[:3] == [CallerState.RECEIVED, CallerState.HELP_COMING, CallerState.ON_SITE]
    assert case is not None
    assert case.state.value == "resolved"
    assert (case.accepted_by, case.resolved_by) == ("a", "a")
    assert case.rating is not None
    assert case.rating.value.value == "up"
    assert any("answers resolved" in s for s in said)


async def test_forged_replayed_and_malformed_answers_change_nothing(
    tmp_path, pty_pair: PtyPair, broker: Broker
):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="forge"
    )
    write_short_village(tmp_path, cfg, first=60.0)
    key_a = load(cfg).village.people["a"].app_key
    assert key_a is not None
    async with running_gateway(cfg) as gw:
        bus = SerialBus(str(pty_pair.device_port))
        caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
        bus.callers[DEV] = caller
        async with bus:
            assert (await caller.press(Key.CALL, give_up_s=5)).acked
            await wait_until(lambda: gw.desk.open_case(DEV) is not None, what="the case")

            def answer(seq: int, key: bytes, **over: object) -> bytes:
                fields: dict[str, object] = {
                    "v": 1,
                    "app_id": "app-a",
                    "person_id": "a",
                    "case_id": f"{DEV}-1",
                    "answer": "accept",
                    "note": "",
                    "sent_at": time.time(),
                    "seq": seq,
                }
                fields.update(over)
                fields["mac"] = sign_answer(key, fields)
                return json.dumps(fields).encode()

            m = gw.metrics
            async with aiomqtt.Client("127.0.0.1", broker.port) as app:
                topic = "onetouch/forge/app/app-a/answer"
                await app.publish(topic, answer(5, b"\x00" * 16), qos=1)  # wrong key
                await app.publish(topic, b"{not json", qos=1)
                await app.publish("onetouch/forge/app/app-b/answer", answer(6, key_a), qos=1)
                await app.publish("onetouch/forge/app/nobody/answer", answer(7, key_a), qos=1)
                for reason in ("bad_mac", "malformed", "mismatch", "unknown_app"):
                    await wait_until(
                        lambda r=reason: m.get("gateway_app_answers_total", outcome=r) == 1,
                        what=f"a {reason} refusal",
                    )
                case = gw.desk.open_case(DEV)
                assert case is not None
                assert case.accepted_by is None  # nothing forged got through
                good = answer(10, key_a)
                await app.publish(topic, good, qos=1)
                await wait_until(
                    lambda: gw.desk.open_case(DEV).accepted_by == "a",  # type: ignore[union-attr]
                    what="the genuine accept",
                )
                await app.publish(topic, good, qos=1)  # the same answer again: a replay
                await wait_until(
                    lambda: m.get("gateway_app_answers_total", outcome="replay") == 1,
                    what="the replay refusal",
                )
    assert m.get("gateway_app_answers_total", outcome="taken") == 1
