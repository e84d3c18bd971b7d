"""Reaching people: the channels the desk's Notify actions go out on.

A channel either takes a message (returns) or refuses it at once (raises
ChannelError: no signal, app offline, no SIM); the desk then tries the next
channel or person without waiting out a timeout.  Whether the person answers
is not the channel's business: answers come back as PersonAnswered events,
and silence is what the desk's deadlines are for.

One channel learns more: a phone call rings, and is picked up or not.  Its
``send`` returns an awaitable ``Delivery``; a call nobody picked up is then a
channel that failed for that person (busy, rejected, no answer), recorded and
fallen through like a refusal.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Channel", "ChannelError", "Delivery", "Outgoing"]


class ChannelError(Exception):
    """The channel cannot take this message now; the reason is for the log."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to one person, with what every channel might need."""

    person_id: str
    person_name: str
    phone: str
    app_id: str | None
    case_id: str | None
    kind: str  # gateway.desk.MessageKind value: call, urgent_call, taken, ...
    text: str  # the desk's text, in the village's language


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a message that a channel took ended, for a channel that can tell."""

    outcome: str  # for the record: accepted, reached, busy, no_answer, rejected, failed
    reached: bool  # the person got it (picked up the call)
    accepted: bool = False  # ... and took the case by doing so
    detail: str = ""


class Channel(Protocol):
    name: str  # "app", "sms" or "voice", as in people.toml

    async def send(self, message: Outgoing) -> Awaitable[Delivery] | None:
        """Hand the message over, or raise ChannelError at once.  A channel
        that learns later whether the person was reached returns an
        awaitable of that ``Delivery``."""
        ...
