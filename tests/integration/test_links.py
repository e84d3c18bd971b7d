"""Links recover on their own: a vanished serial port, a restarted broker."""

from __future__ import annotations

from firmware_protocol import (
    Buzzer,
    CallerState,
    Feedback,
    Key,
    KeyPress,
    LedColor,
    LedPattern,
)
from simulators.caller import CounterFile, SerialBus, SimCaller

from ..conftest import Broker, PtyPair, write_config
from .helpers import MqttDevice, SerialDevice, caller_key, frame, running_gateway, wait_until

DEV = 1003


async def test_serial_port_vanishes_and_returns(tmp_path, pty_pair: PtyPair, broker: Broker):
    cfg = write_config(
        tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port, village="vanish"
    )
    async with running_gateway(cfg) as gw:
        serial_link = next(link for link in gw.links if link.name == "serial:bus1")
        async with SerialDevice(pty_pair.device_port) as dev:
            await dev.write(frame(KeyPress(Key.CALL), DEV, 1))
            await dev.acks_for(DEV, 1)
        pty_pair.stop()  # the USB adapter is pulled out
        await wait_until(lambda: not serial_link.up, what="the serial link to notice")
        # The MQTT link keeps serving while the serial port is gone.
        async with MqttDevice(broker.port, "onetouch/vanish") as mdev:
            await mdev.publish(1004, frame(KeyPress(Key.CALL), 1004, 1))
            await mdev.acks_for(1004, 1)
        pty_pair.start()  # ... and plugged back in
        await wait_until(lambda: serial_link.up, timeout=10, what="the serial port to reopen")
        async with SerialDevice(pty_pair.device_port) as dev:
            await dev.write(frame(KeyPress(Key.HANGUP), DEV, 2))
            await dev.acks_for(DEV, 2)
        events = await gw.store.events()
        assert gw.metrics.get("gateway_link_losses_total", link="serial:bus1") >= 1
    assert [(e.device_id, e.counter) for e in events] == [(DEV, 1), (1004, 1), (DEV, 2)]


async def test_broker_restart_is_survived(tmp_path, fresh_broker: Broker):
    cfg = write_config(tmp_path, mqtt_port=fresh_broker.port, village="restart")
    async with running_gateway(cfg) as gw:
        mqtt_link = next(link for link in gw.links if link.name == "mqtt")
        async with MqttDevice(fresh_broker.port, "onetouch/restart") as dev:
            await dev.publish(DEV, frame(KeyPress(Key.CALL), DEV, 1))
            await dev.acks_for(DEV, 1)
        fresh_broker.restart()
        await wait_until(
            lambda: gw.metrics.get("gateway_link_losses_total", link="mqtt") >= 1,
            what="the MQTT link to notice",
        )
        await wait_until(lambda: mqtt_link.up, timeout=10, what="reconnection")
        async with MqttDevice(fresh_broker.port, "onetouch/restart") as dev:
            await dev.publish(DEV, frame(KeyPress(Key.UP), DEV, 2))
            await dev.acks_for(DEV, 2)
            # Availability follows the usual convention: retained "online".
            status = await _retained(dev, "onetouch/restart/gateway/status")
        events = await gw.store.events()
    assert [e.counter for e in events] == [1, 2]
    assert status == b"online"


async def test_gateway_last_will_is_offline(tmp_path, broker: Broker):
    cfg = write_config(tmp_path, mqtt_port=broker.port, village="lastwill")
    async with running_gateway(cfg):
        pass
    async with MqttDevice(broker.port, "onetouch/lastwill") as dev:
        assert await _retained(dev, "onetouch/lastwill/gateway/status") == b"offline"


async def _retained(dev: MqttDevice, topic: str) -> bytes:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", dev.port) as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            return bytes(message.payload)  # type: ignore[arg-type]
    raise AssertionError("no retained message")


async def test_feedback_reaches_the_caller_and_is_acknowledged(tmp_path, pty_pair: PtyPair):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port)
    async with running_gateway(cfg) as gw:
        bus = SerialBus(str(pty_pair.device_port))
        caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
        bus.callers[DEV] = caller
        async with bus:
            result = await caller.press(Key.CALL, give_up_s=5)
            assert result.acked
            help_coming = Feedback(
                CallerState.HELP_COMING, LedColor.GREEN, LedPattern.STEADY, Buzzer.SHORT
            )
            assert gw.intake is not None
            assert await gw.intake.send_feedback(DEV, help_coming)
    assert caller.state is CallerState.HELP_COMING
    assert caller.led == (LedColor.GREEN, LedPattern.STEADY)
    assert caller.rejected_downlink == 0
