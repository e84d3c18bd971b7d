"""The secretary app channel: a JSON push over the village MQTT broker.

Topics, under the gateway's prefix (``onetouch/{village}`` by default):

    app/{app_id}/notify      gateway -> app   QoS 1, a Notification (JSON, below)
    app/{app_id}/answer      app -> gateway   QoS 1, an Answer, signed
    app/{app_id}/answer_ack  gateway -> app   QoS 1, an AnswerAck: taken or why not
    app/{app_id}/status      app -> broker    retained "online", last will "offline"

An app whose retained status is "offline" refuses the message at once, so the
desk moves to the person's next channel without waiting for a timeout.

Answers are signed with the person's ``app_key`` (people.toml): HMAC-SHA256
over the answer's JSON without its ``mac`` field, keys sorted, no spaces,
UTF-8.  An unsigned "accept" would let anyone on the broker stop the
escalation of a call while nobody comes.  ``seq`` must grow with every answer
of an app; a repeated or older ``seq`` is refused as a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..desk import Person
from ..events import PersonAnswered
from ..log import get_logger
from ..metrics import Metrics
from . import ChannelError, Outgoing

__all__ = ["Answer", "AnswerAck", "AppChannel", "Notification", "sign_answer"]

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


class Answer(BaseModel):
    """A person's answer from the app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    app_id: str
    person_id: str
    case_id: str
    answer: Literal["accept", "decline", "arrived", "resolved"]
    note: Annotated[str, Field(max_length=500)] = ""
    sent_at: Annotated[float, Field(allow_inf_nan=False)]
    seq: Annotated[int, Field(ge=1)]
    mac: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AnswerAck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    seq: int
    case_id: str
    taken: bool
    reason: str = ""


def _signed_bytes(fields: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_answer(key: bytes, fields: Mapping[str, Any]) -> str:
    """The ``mac`` of an answer: what the app computes, and the gateway checks."""
    return hmac.new(key, _signed_bytes(fields), hashlib.sha256).hexdigest()


class _Broker(Protocol):
    @property
    def up(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...

    def subscribe(self, topic_filter: str, handler: object) -> None: ...


class AppChannel:
    name = "app"

    def __init__(
        self,
        broker: _Broker,
        prefix: str,
        *,
        people: Mapping[str, Person] | None = None,
        on_answer: Callable[[PersonAnswered], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._broker = broker
        self._prefix = prefix
        self._by_app = {p.app_id: p for p in (people or {}).values() if p.app_id}
        self._on_answer = on_answer
        self._metrics = metrics or Metrics()
        self._last_seq: dict[str, int] = {}
        self.status: dict[str, str] = {}
        broker.subscribe(f"{prefix}/app/+/status", self._status)
        broker.subscribe(f"{prefix}/app/+/answer", self._answer)

    def set_people(self, people: Mapping[str, Person]) -> None:
        self._by_app = {p.app_id: p for p in people.values() if p.app_id}

    def _app_of(self, topic: str) -> str:
        return topic[len(self._prefix) + len("/app/") :].rsplit("/", 1)[0]

    def _refuse(
        self, app_id: str, reason: str, detail: str, seq: int = 0, case_id: str = ""
    ) -> None:
        self._metrics.inc("gateway_app_answers_total", outcome=reason)
        log.warning(
            "app answer refused",
            app_id=app_id,
            reason=reason,
            detail=detail,
            rate_key=f"{app_id}:{reason}",
        )
        if seq and app_id in self._by_app:
            self._ack(app_id, AnswerAck(seq=seq, case_id=case_id, taken=False, reason=reason))

    def _ack(self, app_id: str, ack: AnswerAck) -> None:
        self._broker.publish(
            f"{self._prefix}/app/{app_id}/answer_ack", ack.model_dump_json().encode()
        )

    def _answer(self, topic: str, payload: bytes) -> None:
        app_id = self._app_of(topic)
        try:
            answer = Answer.model_validate_json(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            self._refuse(app_id, "malformed", problems[:300])
            return
        person = self._by_app.get(app_id)
        if person is None or person.app_key is None:
            self._refuse(app_id, "unknown_app", f"no person in people.toml has app_id {app_id!r}")
            return
        if answer.app_id != app_id or answer.person_id != person.id:
            self._refuse(
                app_id,
                "mismatch",
                f"answer names app {answer.app_id!r} / person {answer.person_id!r} "
                f"on the topic of {app_id!r} ({person.id})",
                answer.seq,
                answer.case_id,
            )
            return
        expected = sign_answer(person.app_key, answer.model_dump())
        if not hmac.compare_digest(expected, answer.mac):
            self._refuse(
                app_id,
                "bad_mac",
                "the signature does not match the person's app_key",
                answer.seq,
                answer.case_id,
            )
            return
        last = self._last_seq.get(app_id, 0)
        if answer.seq <= last:
            self._refuse(
                app_id,
                "replay",
                f"seq {answer.seq} is not above {last}",
                answer.seq,
                answer.case_id,
            )
            return
        self._last_seq[app_id] = answer.seq
        self._metrics.inc("gateway_app_answers_total", outcome="taken")
        log.info("app answer", person=person.id, case=answer.case_id, answer=answer.answer)
        if self._on_answer is not None:
            self._on_answer(
                PersonAnswered(
                    person.id, answer.case_id, answer.answer, answer.note, answer.sent_at
                )
            )
        self._ack(app_id, AnswerAck(seq=answer.seq, case_id=answer.case_id, taken=True))

    def _status(self, topic: str, payload: bytes) -> None:
        app_id = self._app_of(topic)
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
