"""The call desk's data: the village it serves, cases, notices and actions.

Everything here is a frozen dataclass or an enum, and every case and notice
converts to and from plain JSON-able dicts (:func:`case_to_dict`,
:func:`case_from_dict`, ...), so the runtime can store the desk's whole state
after each event and rebuild it after a power cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from firmware_protocol import Feedback

from .roster import Channel, Person, Roster

__all__ = [
    "OPEN_STATES",
    "Action",
    "CallerInfo",
    "CancelDeadline",
    "Case",
    "CaseState",
    "Deadline",
    "DeadlineKind",
    "FollowUp",
    "MessageKind",
    "Notice",
    "NoticeKind",
    "Notify",
    "PersistCase",
    "PersistNotice",
    "Rating",
    "RatingValue",
    "RecordForDistrict",
    "Rejected",
    "ScheduleDeadline",
    "SetCallerFeedback",
    "Settings",
    "Transition",
    "Village",
    "case_from_dict",
    "case_to_dict",
    "notice_from_dict",
    "notice_to_dict",
]


# --- the village -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    must_come_s: float = 1800.0  # accepted → on site, or the person is reminded
    must_come_grace_s: float = 600.0  # after the reminder, before escalating
    cancel_window_s: float = 10.0  # red this soon after green cancels the call
    rating_window_s: float = 86400.0  # thumbs after a resolved case attach to it
    heartbeat_allowance_s: float = 3600.0  # silence longer than this: offline
    low_battery_pct: int = 20
    realarm_s: float = 900.0  # an unanswered case alarms the town again this often
    urgent_repress_s: float = 30.0  # green presses closer than this escalate once


@dataclass(frozen=True, slots=True)
class CallerInfo:
    device_id: int
    resident: str
    address: str = ""
    grid: str | None = None
    phone: str = ""
    lives_alone: bool = False


@dataclass(frozen=True)
class Village:
    name: str
    people: Mapping[str, Person]
    grids: Mapping[str, str]  # grid id → display name
    roster: Roster
    settings: Settings
    callers: Mapping[int, CallerInfo]
    # Where each part came from, so problems can name the file to edit.
    people_source: str = "people.toml"
    roster_source: str = "roster.toml"
    residents_source: str = "residents.toml"


# --- cases -----------------------------------------------------------------


class CaseState(StrEnum):
    OPENED = "opened"
    NOTIFYING = "notifying"
    ACCEPTED = "accepted"
    ON_SITE = "on_site"
    RESOLVED = "resolved"
    CANCELLED = "cancelled"
    UNANSWERED = "unanswered"  # the chain is used up; the town is alarmed


# "unanswered" is open on purpose: the alarm goes on until somebody takes it.
OPEN_STATES = frozenset(
    {
        CaseState.OPENED,
        CaseState.NOTIFYING,
        CaseState.ACCEPTED,
        CaseState.ON_SITE,
        CaseState.UNANSWERED,
    }
)
WAITING_STATES = frozenset({CaseState.OPENED, CaseState.NOTIFYING, CaseState.UNANSWERED})


class DeadlineKind(StrEnum):
    ACK = "ack"  # the person notified has not accepted: try the next one
    MUST_COME = "must_come"  # accepted but not on site: remind the person
    MUST_COME_GRACE = "must_come_grace"  # still not on site after the reminder: escalate
    REALARM = "realarm"  # unanswered: alarm the town level again


@dataclass(frozen=True, slots=True)
class Deadline:
    kind: DeadlineKind
    due_at: float


@dataclass(frozen=True, slots=True)
class Transition:
    """One step in a case's life.  ``from_state == to_state`` records something
    that happened without changing the state (a new person tried, a hang-up)."""

    at: float
    from_state: CaseState | None
    to_state: CaseState
    cause: str
    detail: str = ""


class RatingValue(StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Rating:
    value: RatingValue
    at: float
    device_id: int
    counter: int  # the press that gave it: one press, one rating, never two
    case_id: str | None  # None: general feedback, no case to attach to


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A follow-up visit (回访) after a thumbs down, for the resident's grid leader."""

    case_id: str
    opened_at: float
    assigned_to: tuple[str, ...]
    reason: str = "thumbs_down"


@dataclass(frozen=True, slots=True)
class Case:
    id: str  # "{device_id}-{counter}" of the green press that opened it
    device_id: int
    counter: int
    opened_at: float
    state: CaseState
    grid: str | None = None
    urgent: bool = False
    last_green_at: float = 0.0
    step: int = 0  # index in the escalation chain of the person awaited
    round: int = 0  # pass over the chain, from 0
    current: str | None = None  # the person whose answer is awaited
    tried: tuple[str, ...] = ()  # people tried in this pass
    notified: tuple[str, ...] = ()  # everyone ever told of the case, in order
    # Of ``current``: channels that failed at once, or rang unanswered (with
    # the text that went along).
    failed_channels: tuple[Channel, ...] = ()
    accepted_by: str | None = None
    accepted_at: float | None = None
    on_site_at: float | None = None
    resolved_by: str | None = None
    resolved_at: float | None = None
    alarmed_at: float | None = None  # first "unanswered" alarm
    deadline: Deadline | None = None
    rating: Rating | None = None
    ratings: tuple[Rating, ...] = ()  # every rating ever given, oldest first
    follow_up: FollowUp | None = None
    transitions: tuple[Transition, ...] = field(default=())

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def waiting(self) -> bool:
        """Open and nobody has taken it: must always have a deadline."""
        return self.state in WAITING_STATES


class NoticeKind(StrEnum):
    OFFLINE = "offline"
    LOW_BATTERY = "low_battery"


@dataclass(frozen=True, slots=True)
class Notice:
    device_id: int
    kind: NoticeKind
    since: float
    notified: tuple[str, ...] = ()
    detail: str = ""


# --- actions ---------------------------------------------------------------


class MessageKind(StrEnum):
    CALL = "call"  # please take this case
    URGENT_CALL = "urgent_call"  # the resident pressed again
    MUST_COME_REMINDER = "must_come_reminder"
    TAKEN = "taken"  # someone else has taken the case you were told of
    CANCELLED = "cancelled"  # the resident cancelled the call
    ESCALATED = "escalated"  # you did not come in time; the case moved on
    UNANSWERED_ALARM = "unanswered_alarm"
    FOLLOW_UP = "follow_up"
    CALLER_OFFLINE = "caller_offline"
    CALLER_BACK = "caller_back"
    LOW_BATTERY = "low_battery"


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell a person something.  The runtime tries ``channels`` in order and
    stops at the first that takes the message; each channel that fails at once
    is reported back as ``NotifyFailed``."""

    person_id: str
    channels: tuple[Channel, ...]
    case_id: str | None
    kind: MessageKind
    text: str


@dataclass(frozen=True, slots=True)
class SetCallerFeedback:
    device_id: int
    feedback: Feedback


@dataclass(frozen=True, slots=True)
class ScheduleDeadline:
    """Arm (or re-arm, replacing any earlier one) the case's single timer; when
    it runs out deliver ``DeadlineDue(case_id, kind, due_at)``."""

    case_id: str
    kind: DeadlineKind
    due_at: float


@dataclass(frozen=True, slots=True)
class CancelDeadline:
    case_id: str


@dataclass(frozen=True, slots=True)
class RecordForDistrict:
    """A row for the outbox to the district's case store."""

    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PersistCase:
    """Write the case's new state (in the same transaction as the event).  A
    case that is no longer ``open`` and no longer ratable leaves the desk's
    memory after this; the store keeps it."""

    case: Case


@dataclass(frozen=True, slots=True)
class PersistNotice:
    notice: Notice
    cleared: bool = False  # True: the notice is over; delete it


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event the desk could not use (unknown case or person, stale answer):
    for the log and a counter, never an error."""

    event: str
    reason: str


Action = (
    Notify
    | SetCallerFeedback
    | ScheduleDeadline
    | CancelDeadline
    | RecordForDistrict
    | PersistCase
    | PersistNotice
    | Rejected
)


# --- plain data ------------------------------------------------------------


def _rating_to_dict(r: Rating) -> dict[str, Any]:
    return {
        "value": r.value.value,
        "at": r.at,
        "device_id": r.device_id,
        "counter": r.counter,
        "case_id": r.case_id,
    }


def _rating_from_dict(d: Mapping[str, Any]) -> Rating:
    return Rating(
        RatingValue(d["value"]),
        float(d["at"]),
        int(d["device_id"]),
        int(d["counter"]),
        d["case_id"],
    )


def case_to_dict(case: Case) -> dict[str, Any]:
    """The case as JSON-able plain data (for the store and the district)."""
    return {
        "id": case.id,
        "device_id": case.device_id,
        "counter": case.counter,
        "opened_at": case.opened_at,
        "state": case.state.value,
        "grid": case.grid,
        "urgent": case.urgent,
        "last_green_at": case.last_green_at,
        "step": case.step,
        "round": case.round,
        "current": case.current,
        "tried": list(case.tried),
        "notified": list(case.notified),
        "failed_channels": [c.value for c in case.failed_channels],
        "accepted_by": case.accepted_by,
        "accepted_at": case.accepted_at,
        "on_site_at": case.on_site_at,
        "resolved_by": case.resolved_by,
        "resolved_at": case.resolved_at,
        "alarmed_at": case.alarmed_at,
        "deadline": None
        if case.deadline is None
        else {"kind": case.deadline.kind.value, "due_at": case.deadline.due_at},
        "rating": None if case.rating is None else _rating_to_dict(case.rating),
        "ratings": [_rating_to_dict(r) for r in case.ratings],
        "follow_up": None
        if case.follow_up is None
        else {
            "case_id": case.follow_up.case_id,
            "opened_at": case.follow_up.opened_at,
            "assigned_to": list(case.follow_up.assigned_to),
            "reason": case.follow_up.reason,
        },
        "transitions": [
            {
                "at": t.at,
                "from": None if t.from_state is None else t.from_state.value,
                "to": t.to_state.value,
                "cause": t.cause,
                "detail": t.detail,
            }
            for t in case.transitions
        ],
    }


def case_from_dict(d: Mapping[str, Any]) -> Case:
    deadline = d.get("deadline")
    follow_up = d.get("follow_up")
    rating = d.get("rating")
    return Case(
        id=d["id"],
        device_id=int(d["device_id"]),
        counter=int(d["counter"]),
        opened_at=float(d["opened_at"]),
        state=CaseState(d["state"]),
        grid=d.get("grid"),
        urgent=bool(d.get("urgent", False)),
        last_green_at=float(d.get("last_green_at", d["opened_at"])),
        step=int(d.get("step", 0)),
        round=int(d.get("round", 0)),
        current=d.get("current"),
        tried=tuple(d.get("tried", ())),
        notified=tuple(d.get("notified", ())),
        failed_channels=tuple(Channel(c) for c in d.get("failed_channels", ())),
        accepted_by=d.get("accepted_by"),
        accepted_at=d.get("accepted_at"),
        on_site_at=d.get("on_site_at"),
        resolved_by=d.get("resolved_by"),
        resolved_at=d.get("resolved_at"),
        alarmed_at=d.get("alarmed_at"),
        deadline=None
        if deadline is None
        else Deadline(DeadlineKind(deadline["kind"]), float(deadline["due_at"])),
        rating=None if rating is None else _rating_from_dict(rating),
        ratings=tuple(_rating_from_dict(r) for r in d.get("ratings", ())),
        follow_up=None
        if follow_up is None
        else FollowUp(
            follow_up["case_id"],
            float(follow_up["opened_at"]),
            tuple(follow_up["assigned_to"]),
            follow_up.get("reason", "thumbs_down"),
        ),
        transitions=tuple(
            Transition(
                float(t["at"]),
                None if t["from"] is None else CaseState(t["from"]),
                CaseState(t["to"]),
                t["cause"],
                t.get("detail", ""),
            )
            for t in d.get("transitions", ())
        ),
    )


def notice_to_dict(notice: Notice) -> dict[str, Any]:
    return {
        "device_id": notice.device_id,
        "kind": notice.kind.value,
        "since": notice.since,
        "notified": list(notice.notified),
        "detail": notice.detail,
    }


def notice_from_dict(d: Mapping[str, Any]) -> Notice:
    return Notice(
        int(d["device_id"]),
        NoticeKind(d["kind"]),
        float(d["since"]),
        tuple(d.get("notified", ())),
        d.get("detail", ""),
    )
