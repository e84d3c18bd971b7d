"""Presses over a real pty and a real mosquitto reach the journal exactly once."""

from __future__ import annotations

import os

import pytest

from firmware_protocol import Ack, AckStatus, Heartbeat, Key, KeyPress, MsgType, verify_mac

from ..conftest import Broker, PtyPair, write_config
from .helpers import (
    MqttDevice,
    SerialDevice,
    caller_key,
    frame,
    running_gateway,
    wait_until,
)

DEV = 1001
OTHER = 1002


async def test_serial_press_stored_once_despite_retransmissions(tmp_path, pty_pair: PtyPair):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        press = frame(KeyPress(Key.CALL), DEV, 7)
        for n in (1, 2, 3):
            await dev.write(press)
            acks = await dev.acks_for(DEV, 7, n=n)
        events = await gw.store.events(device_id=DEV)
    assert [(e.counter, e.key) for e in events] == [(7, Key.CALL)]
    # Every acknowledgement is authentic, says "stored", and has its own counter.
    assert all(verify_mac(a, caller_key(DEV)) for a in acks)
    assert all(a.type is MsgType.ACK and a.message == Ack(7, AckStatus.STORED) for a in acks)
    assert len({a.counter for a in acks}) == 3
    assert gw.metrics.get("gateway_duplicate_frames_total") == 2


async def test_mqtt_press_stored_once_despite_retransmissions(tmp_path, broker: Broker):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="mqttonce")
    async with running_gateway(cfg) as gw, MqttDevice(broker.port, "onetouch/mqttonce") as dev:
        press = frame(KeyPress(Key.UP), DEV, 3)
        for _ in range(3):
            await dev.publish(DEV, press)
        await dev.acks_for(DEV, 3, n=3)
        heartbeat = frame(Heartbeat(2900, 40, -80, False, False), DEV, 4)
        await dev.publish(DEV, heartbeat)
        await dev.acks_for(DEV, 4)
        events = await gw.store.events(device_id=DEV)
    assert [e.counter for e in events] == [3, 4]
    assert events[0].key is Key.UP
    assert events[0].link == "mqtt"


async def test_every_press_is_its_own_event(tmp_path, pty_pair: PtyPair):
    """Presses in the same instant from one caller are never merged."""
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        burst = b"".join(frame(KeyPress(Key.CALL), DEV, c) for c in range(1, 21))
        await dev.write(burst)
        for c in range(1, 21):
            await dev.acks_for(DEV, c)
        events = await gw.store.events(device_id=DEV)
    assert [e.counter for e in events] == list(range(1, 21))


async def test_replay_and_forgery_rejected_and_counted(tmp_path, pty_pair: PtyPair):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        await dev.write(frame(KeyPress(Key.CALL), DEV, 100))
        await dev.acks_for(DEV, 100)
        # A counter far below the mark with a valid MAC: a recorded frame replayed.
        await dev.write(frame(KeyPress(Key.CALL), DEV, 9))
        # The same counter with other content.
        await dev.write(frame(KeyPress(Key.HANGUP), DEV, 100))
        # A frame signed with the wrong key.
        await dev.write(frame(KeyPress(Key.CALL), DEV, 11, key=os.urandom(16)))
        # A caller the village does not know.
        await dev.write(frame(KeyPress(Key.CALL), 99, 1, key=os.urandom(16)))
        # Still serving everyone else.
        await dev.write(frame(KeyPress(Key.CALL), OTHER, 1))
        await dev.acks_for(OTHER, 1)
        m = gw.metrics
        await wait_until(
            lambda: (
                m.get("gateway_rejected_frames_total", reason="replay", link="serial:bus1") == 2
            ),
            what="two replays counted",
        )
        assert m.get("gateway_rejected_frames_total", reason="bad_mac", link="serial:bus1") == 1
        assert (
            m.get("gateway_rejected_frames_total", reason="unknown_device", link="serial:bus1") == 1
        )
        events = await gw.store.events()
    assert [(e.device_id, e.counter) for e in events] == [(DEV, 100), (OTHER, 1)]
    assert not [f for f in dev.frames if f.device_id == DEV and f.message == Ack(9)]


async def test_garbage_on_the_line_loses_nothing(tmp_path, pty_pair: PtyPair):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        good = frame(KeyPress(Key.CALL), DEV, 1)
        damaged = bytearray(frame(KeyPress(Key.CALL), OTHER, 1))
        damaged[14] ^= 0xFF
        await dev.write(b"\x00\xff\xa5noise\xa5\x5a\x01" + bytes(damaged) + good[:9])
        await dev.write(good[9:] + b"\xa5\x5a\x01\x01\x00\x00\x00\x01\x00\x00\x00\x01\xff")
        await dev.acks_for(DEV, 1)
        await dev.write(frame(KeyPress(Key.DOWN), DEV, 2))
        await dev.acks_for(DEV, 2)
        m = gw.metrics
        assert m.get("gateway_rejected_frames_total", reason="bad_crc", link="serial:bus1") >= 1
        assert m.get("gateway_rejected_frames_total", reason="garbage", link="serial:bus1") >= 1
        events = await gw.store.events()
    assert [(e.device_id, e.counter) for e in events] == [(DEV, 1), (DEV, 2)]


@pytest.mark.parametrize(
    ("topic_id", "payload", "reason"),
    [
        ("1001", b"not a frame at all", "garbage"),
        ("1001", b"", "malformed"),
        ("abc", b"\x00", "topic_mismatch"),
        ("1002", None, "topic_mismatch"),  # a frame of 1001 on 1002's topic
    ],
)
async def test_malformed_mqtt_payloads_counted(tmp_path, broker: Broker, topic_id, payload, reason):
    village = f"bad{abs(hash((topic_id, reason))) % 10_000}"
    cfg = write_config(tmp_path, mqtt_port=broker.port, village=village)
    prefix = f"onetouch/{village}"
    async with running_gateway(cfg) as gw, MqttDevice(broker.port, prefix) as dev:
        body = payload if payload is not None else frame(KeyPress(Key.CALL), DEV, 1)
        await dev.publish(topic_id, body)
        await wait_until(
            lambda: (
                gw.metrics.get("gateway_rejected_frames_total", reason=reason, link="mqtt") == 1
            ),
            what=f"a {reason} rejection",
        )
        await dev.publish(OTHER, frame(KeyPress(Key.CALL), OTHER, 1))
        await dev.acks_for(OTHER, 1)
        events = await gw.store.events()
    assert [(e.device_id, e.counter) for e in events] == [(OTHER, 1)]


async def test_retransmission_after_restart_is_acknowledged_not_repeated(
    tmp_path, pty_pair: PtyPair
):
    """After a restart the journal, not memory, decides what was already stored."""
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    press = frame(KeyPress(Key.CALL), DEV, 5)
    async with running_gateway(cfg), SerialDevice(pty_pair.device_port) as dev:
        await dev.write(press)
        first = (await dev.acks_for(DEV, 5))[0]
        await dev.write(frame(Heartbeat(3000, 80, None, True, False), DEV, 200))
        await dev.acks_for(DEV, 200)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        await dev.write(press)
        again = (await dev.acks_for(DEV, 5))[0]
        await dev.write(frame(KeyPress(Key.CALL), DEV, 4))  # far below the mark, never stored
        await wait_until(
            lambda: (
                gw.metrics.get("gateway_rejected_frames_total", reason="replay", link="serial:bus1")
                == 1
            )
        )
        keys = [e for e in await gw.store.events(device_id=DEV) if e.counter == 5]
    assert len(keys) == 1
    # The caller never sees a downlink counter go backwards across a restart.
    assert again.counter > first.counter


async def test_press_lost_once_and_repeated_after_a_later_frame_is_accepted(
    tmp_path, pty_pair: PtyPair
):
    """A caller's first copy is lost, a heartbeat gets through, then the repeat arrives."""
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        await dev.write(frame(Heartbeat(3000, 80, None, True, False), DEV, 11))
        await dev.acks_for(DEV, 11)
        late = frame(KeyPress(Key.CALL), DEV, 10)
        await dev.write(late)
        await dev.acks_for(DEV, 10)
        await dev.write(late)  # and once more: a duplicate now, not a second event
        await dev.acks_for(DEV, 10, n=2)
        events = await gw.store.events(device_id=DEV)
        assert gw.metrics.get("gateway_late_frames_total", link="serial:bus1") == 1
    assert [e.counter for e in events] == [11, 10]


async def test_cut_frame_does_not_hold_back_the_next(tmp_path, pty_pair: PtyPair):
    """A collision leaves half a header whose length swallows the next frame."""
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw, SerialDevice(pty_pair.device_port) as dev:
        cut = frame(KeyPress(Key.CALL), OTHER, 1)[:12] + bytes([60])  # promises 60 bytes
        await dev.write(cut + frame(KeyPress(Key.CALL), DEV, 1))  # 25 bytes: not enough
        await dev.acks_for(DEV, 1, timeout=3)  # no further traffic needed
        assert (
            gw.metrics.get("gateway_rejected_frames_total", reason="truncated", link="serial:bus1")
            >= 1
        )
