"""Answers that come back over the phone network: SMS replies and call keypresses.

A reply names its case (its 单号, e.g. "1 1017-5") or, when it does not, it
means the newest open case the sender was told about.  Senders who are not in
people.toml are ignored and logged: an SMS is no proof of who sent it beyond
the number, so only numbers the village registered can answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

from ..desk import Desk, Person
from ..events import PersonAnswered
from ..log import get_logger
from ..metrics import Metrics
from . import Delivery, Outgoing
from .modem import CallOutcome, parse_reply

__all__ = ["PhoneAnswers", "normalise_number"]

log = get_logger("gateway.notify.answers")


def normalise_number(number: str) -> str:
    digits = re.sub(r"\D", "", number)
    if len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]
    return digits


class PhoneAnswers:
    def __init__(
        self,
        *,
        people: Mapping[str, Person],
        desk: Callable[[], Desk],
        submit: Callable[[PersonAnswered], None],
        metrics: Metrics,
    ) -> None:
        self._desk = desk
        self._submit = submit
        self._metrics = metrics
        self.set_people(people)

    def set_people(self, people: Mapping[str, Person]) -> None:
        self._by_number = {normalise_number(p.phone): p for p in people.values() if p.phone}

    def on_sms(self, sender: str, text: str, received_at: float) -> None:
        person = self._by_number.get(normalise_number(sender))
        if person is None:
            self._metrics.inc("gateway_sms_replies_total", outcome="unknown_sender")
            log.warning(
                "SMS from a number not in people.toml ignored",
                sender=sender,
                rate_key=f"sms:{normalise_number(sender)}",
            )
            return
        parsed = parse_reply(text)
        if parsed is None:
            self._metrics.inc("gateway_sms_replies_total", outcome="not_understood")
            log.warning(
                "SMS reply not understood",
                person=person.id,
                text=text[:80],
                rate_key=f"sms-text:{person.id}",
            )
            return
        answer, code = parsed
        case_id = code if code is not None else self._latest_case(person.id)
        if case_id is None:
            self._metrics.inc("gateway_sms_replies_total", outcome="no_case")
            log.warning(
                "SMS reply names no case and the sender has no open one",
                person=person.id,
                answer=answer,
            )
            return
        self._metrics.inc("gateway_sms_replies_total", outcome="taken")
        log.info("SMS answer", person=person.id, case=case_id, answer=answer)
        self._submit(PersonAnswered(person.id, case_id, answer, text[:200], received_at))

    def _latest_case(self, person_id: str) -> str | None:
        told = [c for c in self._desk().snapshot().cases if c.open and person_id in c.notified]
        return max(told, key=lambda c: c.opened_at).id if told else None

    def on_call(self, message: Outgoing, outcome: CallOutcome, delivery: Delivery) -> None:
        """A call has ended.  An acceptance (the accept key, or a picked-up
        call where the village counts that) becomes the person's answer, through
        the intake like every answer; what the call did is recorded on the
        case by the dispatcher."""
        self._metrics.inc("gateway_calls_total", result=outcome.result.value)
        log.info(
            "call outcome",
            person=message.person_id,
            case=message.case_id,
            result=outcome.result.value,
            outcome=delivery.outcome,
            digits=outcome.digits,
            accepted=delivery.accepted,
        )
        if delivery.accepted and message.case_id is not None:
            self._submit(
                PersonAnswered(
                    message.person_id, message.case_id, "accept", delivery.detail, time.time()
                )
            )
