"""MQTT link: callers on radio or Wi-Fi reach the gateway through a broker.

The payload of every message is exactly one protocol frame, the same bytes as
on the serial bus, so firmware has one code path and one security model.

Reconnection is one supervised loop: every failure, whatever raised it, ends
in the same ``except`` and the same backoff, so there is no callback thread
that can die and leave the gateway deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt

from firmware_protocol import Reason, Rejected, decode_frame

from ..config import MqttLinkConfig
from ..log import get_logger
from ..metrics import Metrics
from ._backoff import Backoff
from ._types import Submit

__all__ = ["MqttLink", "Topics"]

log = get_logger("gateway.links.mqtt")

# Acknowledgements are cheap to lose (the caller repeats its frame and gets a
# fresh one), but a backlog must not grow without bound while the broker is away.
_DOWNLINK_QUEUE_MAX = 10_000
_PUBLISHES_IN_FLIGHT = 64


class Topics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.uplink_filter = f"{prefix}/caller/+/up"
        self.status_filter = f"{prefix}/caller/+/status"
        self.gateway_status = f"{prefix}/gateway/status"
        self._caller = re.compile(re.escape(prefix) + r"/caller/([^/]+)/(up|status)\Z")

    def down(self, device_id: int) -> str:
        return f"{self.prefix}/caller/{device_id}/down"

    def up(self, device_id: int) -> str:
        return f"{self.prefix}/caller/{device_id}/up"

    def status(self, device_id: int) -> str:
        return f"{self.prefix}/caller/{device_id}/status"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``(device id text, "up" | "status")`` for a caller topic, else None."""
        m = self._caller.match(topic)
        return (m.group(1), m.group(2)) if m else None


class MqttLink:
    name = "mqtt"

    def __init__(
        self,
        config: MqttLinkConfig,
        *,
        topic_prefix: str,
        client_id: str,
        submit: Submit,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.topics = Topics(topic_prefix)
        self.client_id = client_id
        self.submit = submit
        self.metrics = metrics
        self.connected = asyncio.Event()
        self._outbox: deque[tuple[str, bytes, bool]] = deque()  # topic, payload, retain
        self._wake = asyncio.Event()
        self.caller_status: dict[int, str] = {}
        # Other parts of the gateway (the app channel) listen on their own topics.
        self._handlers: list[tuple[str, Callable[[str, bytes], None]]] = []

    @property
    def up(self) -> bool:
        return self.connected.is_set()

    def send(self, device_id: int, frame: bytes) -> bool:
        return self.publish(self.topics.down(device_id), frame)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 message; it goes out as soon as the broker is connected."""
        if len(self._outbox) >= _DOWNLINK_QUEUE_MAX:
            self._outbox.popleft()
            self.metrics.inc("gateway_downlink_dropped_total", link=self.name, kind="overflow")
        self._outbox.append((topic, payload, retain))
        self._wake.set()
        return True

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Call ``handler(topic, payload)`` for messages on ``topic_filter``.

        Register before ``run``; the subscription is renewed on every reconnect.
        """
        self._handlers.append((topic_filter, handler))

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self.client_id,
            username=cfg.username,
            password=cfg.password,
            # A persistent session: presses published while the gateway is
            # reconnecting wait at the broker instead of being lost.
            clean_session=False,
            keepalive=cfg.keepalive_s,
            will=aiomqtt.Will(self.topics.gateway_status, b"offline", qos=1, retain=True),
            # Nagle's algorithm adds up to 40 ms to a small acknowledgement.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            timeout=10,
        )
        # Up to _PUBLISHES_IN_FLIGHT acknowledgements are in flight by design.
        client.pending_calls_threshold = _PUBLISHES_IN_FLIGHT + 16
        return client

    async def run(self) -> None:
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topics.uplink_filter, qos=1)
                    await client.subscribe(self.topics.status_filter, qos=1)
                    for topic_filter, _handler in self._handlers:
                        await client.subscribe(topic_filter, qos=1)
                    await client.publish(self.topics.gateway_status, b"online", qos=1, retain=True)
                    self.connected.set()
                    backoff.reset()
                    self.metrics.set("gateway_link_up", 1, link=self.name)
                    log.info(
                        "connected to MQTT broker",
                        host=self.config.host,
                        port=self.config.port,
                        client_id=self.client_id,
                    )
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._publisher(client))
                            async for message in client.messages:
                                self._received(message)
                    except asyncio.CancelledError:
                        # A clean stop sends no last will, so say it ourselves.
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(1.0):
                                await client.publish(
                                    self.topics.gateway_status, b"offline", qos=1, retain=True
                                )
                        raise
                    # The message iterator ends only when the connection does.
                    raise aiomqtt.MqttError("message stream ended")
            except* aiomqtt.MqttError as group:
                exc: BaseException = group.exceptions[0]
            except* Exception as group:  # a bug must not end the link for good
                exc = group.exceptions[0]
                self.metrics.inc("gateway_intake_errors_total", link=self.name)
                log.error("MQTT link failed unexpectedly", error=repr(exc), rate_key="crash")
            self.connected.clear()
            self.metrics.set("gateway_link_up", 0, link=self.name)
            self.metrics.inc("gateway_link_losses_total", link=self.name)
            delay = backoff.next()
            log.warning(
                "MQTT broker unreachable; reconnecting",
                host=self.config.host,
                port=self.config.port,
                error=str(exc),
                retry_in_s=round(delay, 2),
                rate_key="reconnect",
            )
            await asyncio.sleep(delay)

    async def _publisher(self, client: aiomqtt.Client) -> None:
        slots = asyncio.Semaphore(_PUBLISHES_IN_FLIGHT)
        async with asyncio.TaskGroup() as tg:
            while True:
                while not self._outbox:
                    self._wake.clear()
                    await self._wake.wait()
                topic, payload, retain = self._outbox.popleft()
                await slots.acquire()
                tg.create_task(self._publish(client, slots, topic, payload, retain))

    async def _publish(
        self,
        client: aiomqtt.Client,
        slots: asyncio.Semaphore,
        topic: str,
        payload: bytes,
        retain: bool,
    ) -> None:
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
            self.metrics.inc("gateway_downlink_frames_total", link=self.name)
        finally:
            slots.release()

    def _received(self, message: Any) -> None:
        try:
            self._dispatch(str(message.topic), message.payload)
        except Exception:
            self.metrics.inc("gateway_intake_errors_total", link=self.name)
            log.exception(
                "MQTT message handling failed", topic=str(message.topic), rate_key="dispatch"
            )

    def _dispatch(self, topic: str, payload: Any) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            for topic_filter, handler in self._handlers:
                if aiomqtt.Topic(topic).matches(topic_filter):
                    handler(topic, data)
            return
        ident, kind = parsed
        if not ident.isdigit() or not 1 <= int(ident) <= 0xFFFFFFFF:
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            self.submit(
                Rejected(
                    Reason.TOPIC_MISMATCH,
                    data[:64],
                    f"topic {topic!r} does not name a caller id (1..4294967295)",
                ),
                self,
            )
            return
        device_id = int(ident)
        if kind == "status":
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
            if self.caller_status.get(device_id) != text:
                self.caller_status[device_id] = text
                log.info("caller availability", device=device_id, status=text)
            return
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        item = decode_frame(bytes(payload))
        if not isinstance(item, Rejected) and item.device_id != device_id:
            item = Rejected(
                Reason.TOPIC_MISMATCH,
                item.raw,
                f"frame from caller {item.device_id} published on the topic of caller {device_id}",
                item.device_id,
                item.counter,
            )
        self.submit(item, self)
