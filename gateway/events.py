"""Typed events produced at the edge and consumed by the call desk.

Plain frozen dataclasses: pydantic stays at the boundaries, not in the core.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_protocol import Key

__all__ = ["CallerEvent", "HeartbeatReceived", "KeyPressed"]


@dataclass(frozen=True, slots=True)
class CallerEvent:
    """Something a caller sent, durably journalled before anyone acts on it.

    ``(device_id, counter)`` identifies the event for good: the caller never
    reuses a counter, and the journal refuses a second row for it.
    """

    device_id: int
    counter: int
    link: str  # which link it came in on, e.g. "serial:bus1" or "mqtt"
    received_at: float  # wall clock, Unix seconds
    wall_trusted: bool  # False while the clock is not synchronised


@dataclass(frozen=True, slots=True)
class KeyPressed(CallerEvent):
    key: Key


@dataclass(frozen=True, slots=True)
class HeartbeatReceived(CallerEvent):
    battery_mv: int
    battery_pct: int | None
    signal_dbm: int | None
    external_power: bool
    low_battery: bool


# --- events for the call desk that do not come from a caller ----------------
# Appended for the call desk (gateway/desk/); see docs/desk.md.

__all__ += ["DeadlineDue", "DeskEvent", "NotifyFailed", "PersonAnswered", "Tick"]


@dataclass(frozen=True, slots=True)
class PersonAnswered:
    """A person's answer about a case, from the secretary app, an SMS reply or
    the voice menu.  ``answer`` is one of accept, decline, arrived, resolved."""

    person_id: str
    case_id: str
    answer: str
    note: str = ""
    at: float = 0.0  # when the person answered (their device's clock), for the record


@dataclass(frozen=True, slots=True)
class DeadlineDue:
    """The case's timer ran out.  ``due_at`` is the value from the
    ScheduleDeadline that armed it; a timer that was replaced meanwhile is
    recognised by it and ignored."""

    case_id: str
    kind: str
    due_at: float | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic supervision (about once a minute): silent callers, lost timers."""


@dataclass(frozen=True, slots=True)
class NotifyFailed:
    """A channel could not take a message at once (modem refused the SMS, the
    app push was rejected), or a call rang and nobody picked up (busy,
    rejected, no answer: ``reason``).  Not for messages taken but not answered:
    those are timeouts.  ``along`` names channels that went with this one and
    are no way to reach the person without it (the text sent with a call)."""

    person_id: str
    case_id: str | None
    channel: str
    reason: str = ""
    along: tuple[str, ...] = ()


DeskEvent = KeyPressed | HeartbeatReceived | PersonAnswered | DeadlineDue | Tick | NotifyFailed
