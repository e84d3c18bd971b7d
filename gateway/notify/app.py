"""The secretary app channel: a JSON push over the village MQTT broker.

Topics, under the gateway's prefix (``onetouch/{village}`` by default):

    app/{app_id}/notify   gateway -> app   QoS 1, a Notification (JSON, below)
    app/{app_id}/status   app -> broker    retained "online", last will "offline"

An app whose retained status is "offline" refuses the message at once, so the
desk moves to the person's next channel without waiting for a timeout.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from ..log import get_logger
from . import ChannelError, Outgoing

__all__ = ["AppChannel", "Notification"]

log = get_logger("gateway.notify.app")


class Notification(BaseModel):
    """What the app receives.  ``v`` changes only with an incompatible change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    message_id: str
    person_id: str
    case_id: str | None
    kind: str
    text: str
    sent_at: float


class _Broker(Protocol):
    @property
    def up(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...

    def subscribe(self, topic_filter: str, handler: object) -> None: ...


class AppChannel:
    name = "app"

    def __init__(self, broker: _Broker, prefix: str) -> None:
        self._broker = broker
        self._prefix = prefix
        self.status: dict[str, str] = {}
        broker.subscribe(f"{prefix}/app/+/status", self._status)

    def _status(self, topic: str, payload: bytes) -> None:
        app_id = topic[len(self._prefix) + len("/app/") :].rsplit("/", 1)[0]
        text = payload.decode("utf-8", "replace").strip()
        if self.status.get(app_id) != text:
            self.status[app_id] = text
            log.info("secretary app availability", app_id=app_id, status=text)

    async def send(self, message: Outgoing) -> None:
        if not message.app_id:
            raise ChannelError(f"{message.person_id} has no app_id")
        if not self._broker.up:
            raise ChannelError("the MQTT broker is not connected")
        if self.status.get(message.app_id) == "offline":
            raise ChannelError(f"app {message.app_id} is offline")
        body = Notification(
            message_id=uuid.uuid4().hex,
            person_id=message.person_id,
            case_id=message.case_id,
            kind=message.kind,
            text=message.text,
            sent_at=time.time(),
        )
        topic = f"{self._prefix}/app/{message.app_id}/notify"
        if not self._broker.publish(topic, body.model_dump_json().encode()):
            raise ChannelError("the MQTT link refused the message")
