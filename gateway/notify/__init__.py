"""Reaching people: the channels the desk's Notify actions go out on.

A channel either takes a message (returns) or refuses it at once (raises
ChannelError: no signal, app offline, no SIM); the desk then tries the next
channel or person without waiting out a timeout.  Whether the person answers
is not the channel's business: answers come back as PersonAnswered events,
and silence is what the desk's deadlines are for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Channel", "ChannelError", "Outgoing"]


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


class Channel(Protocol):
    name: str  # "app", "sms" or "voice", as in people.toml

    async def send(self, message: Outgoing) -> None:
        """Hand the message over, or raise ChannelError at once."""
        ...
