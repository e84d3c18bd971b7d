"""The call desk: events and ``now`` in, actions out.  The rules are in docs/desk.md.

No I/O, no clock, no awaiting.  The desk's whole state is its open cases (plus
resolved cases that can still be rated), the caller notices and when each
caller was last heard; :meth:`Desk.snapshot` and :meth:`Desk.restore` move it
to and from plain data.  Every event that changes a case yields a
:class:`PersistCase` and a ``RecordForDistrict("case", ...)`` carrying the new
state, and any change of the case's single deadline yields a
:class:`ScheduleDeadline` or :class:`CancelDeadline`, derived from the case data
itself so timers and data cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from firmware_protocol import Buzzer, CallerState, Feedback, Key, LedColor, LedPattern

from ..events import (
    DeadlineDue,
    DeskEvent,
    HeartbeatReceived,
    KeyPressed,
    NotifyFailed,
    PersonAnswered,
    Tick,
)
from .model import (
    WAITING_STATES,
    Action,
    CallerInfo,
    CancelDeadline,
    Case,
    CaseState,
    Deadline,
    DeadlineKind,
    FollowUp,
    MessageKind,
    Notice,
    NoticeKind,
    Notify,
    PersistCase,
    PersistNotice,
    Rating,
    RatingValue,
    RecordForDistrict,
    Rejected,
    ScheduleDeadline,
    SetCallerFeedback,
    Transition,
    Village,
    case_from_dict,
    case_to_dict,
    notice_from_dict,
    notice_to_dict,
)
from .roster import Channel, Person, Role, next_attempt

__all__ = ["Desk", "DeskSnapshot", "caller_feedback"]

# Tick fires a deadline only when the runtime's own timer is this late: the
# timer is the normal path, Tick is the safety net for a lost one.
TICK_LATE_S = 5.0

_FB_RECEIVED = Feedback(CallerState.RECEIVED, LedColor.AMBER, LedPattern.SLOW_BLINK, Buzzer.SILENT)
_FB_STILL_TRYING = Feedback(
    CallerState.STILL_TRYING, LedColor.AMBER, LedPattern.SLOW_BLINK, Buzzer.SILENT
)
_FB_HELP_COMING = Feedback(
    CallerState.HELP_COMING, LedColor.GREEN, LedPattern.SLOW_BLINK, Buzzer.DOUBLE
)
_FB_ON_SITE = Feedback(CallerState.ON_SITE, LedColor.GREEN, LedPattern.STEADY, Buzzer.SHORT)
_FB_IDLE = Feedback(CallerState.IDLE, LedColor.OFF, LedPattern.OFF, Buzzer.SHORT)
_FB_CANCELLED = Feedback(CallerState.CANCELLED, LedColor.RED, LedPattern.STEADY, Buzzer.SHORT, 5)
_FB_THANKS = Feedback(CallerState.THANKS, LedColor.GREEN, LedPattern.STEADY, Buzzer.SHORT, 5)


def caller_feedback(case: Case) -> Feedback:
    """What the caller of an open case should show."""
    if case.state is CaseState.ACCEPTED:
        return _FB_HELP_COMING
    if case.state is CaseState.ON_SITE:
        return _FB_ON_SITE
    if case.state in (CaseState.RESOLVED, CaseState.CANCELLED):
        return _FB_IDLE
    # "Still trying" once the call has gone past its first person.
    if case.state is CaseState.UNANSWERED or case.round > 0 or len(case.notified) > 1:
        return _FB_STILL_TRYING
    return _FB_RECEIVED


@dataclass(frozen=True, slots=True)
class DeskSnapshot:
    cases: tuple[Case, ...]
    notices: tuple[Notice, ...]
    last_seen: Mapping[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": [case_to_dict(c) for c in self.cases],
            "notices": [notice_to_dict(n) for n in self.notices],
            "last_seen": {str(k): v for k, v in sorted(self.last_seen.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeskSnapshot:
        return cls(
            tuple(case_from_dict(c) for c in data.get("cases", ())),
            tuple(notice_from_dict(n) for n in data.get("notices", ())),
            {int(k): float(v) for k, v in data.get("last_seen", {}).items()},
        )


@dataclass(slots=True)
class _Out:
    """Actions of one event, grouped so that what must be written comes first
    and every touched case is persisted exactly once, in its final state."""

    before: dict[str, Deadline | None] = field(default_factory=dict)
    touched: dict[str, Case] = field(default_factory=dict)
    records: list[Action] = field(default_factory=list)
    notices: list[Action] = field(default_factory=list)
    outward: list[Action] = field(default_factory=list)  # notify, feedback, rejected

    def touch(self, old: Case | None, new: Case) -> None:
        if new.id not in self.before:
            self.before[new.id] = None if old is None else old.deadline
        self.touched[new.id] = new

    def actions(self) -> list[Action]:
        persist: list[Action] = []
        timers: list[Action] = []
        for case_id, case in self.touched.items():
            persist.append(PersistCase(case))
            persist.append(RecordForDistrict("case", case_to_dict(case)))
            if case.deadline != self.before[case_id]:
                if case.deadline is None:
                    timers.append(CancelDeadline(case_id))
                else:
                    timers.append(
                        ScheduleDeadline(case_id, case.deadline.kind, case.deadline.due_at)
                    )
        return [*persist, *self.notices, *self.records, *timers, *self.outward]


class Desk:
    """The pure call desk of one village.

    ``handle(event, now)`` is the only way state changes.  ``now`` is wall time
    in Unix seconds; the desk never reads a clock.
    """

    def __init__(self, village: Village) -> None:
        self.village = village
        self._cases: dict[str, Case] = {}
        self._open: dict[int, str] = {}  # device → its open case
        self._resolved: dict[int, str] = {}  # device → its latest ratable resolved case
        self._notices: dict[tuple[int, NoticeKind], Notice] = {}
        self._last_seen: dict[int, float] = {}

    # --- state as data ---------------------------------------------------

    @property
    def cases(self) -> Mapping[str, Case]:
        return dict(self._cases)

    @property
    def notices(self) -> tuple[Notice, ...]:
        return tuple(self._notices.values())

    def open_case(self, device_id: int) -> Case | None:
        case_id = self._open.get(device_id)
        return None if case_id is None else self._cases[case_id]

    def snapshot(self) -> DeskSnapshot:
        return DeskSnapshot(
            tuple(sorted(self._cases.values(), key=lambda c: c.id)),
            tuple(sorted(self._notices.values(), key=lambda n: (n.device_id, n.kind))),
            dict(self._last_seen),
        )

    def restore(
        self,
        cases: Iterable[Case],
        notices: Iterable[Notice] = (),
        last_seen: Mapping[int, float] | None = None,
    ) -> list[ScheduleDeadline]:
        """Rebuild the state (replacing any) and return the timers to re-arm.

        Give it every open case and each device's latest resolved case; closed
        cases are ignored.  A deadline already past is returned as it is: the
        runtime fires it at once, so the escalation goes on where it stopped.
        """
        self._cases.clear()
        self._open.clear()
        self._resolved.clear()
        for case in cases:
            if case.open:
                self._index(case)
            elif case.state is CaseState.RESOLVED:
                # Only each device's latest resolved case can take a rating.
                prior = self._resolved.get(case.device_id)
                if prior is None or _resolved_key(self._cases[prior]) < _resolved_key(case):
                    self._index(case)
        self._notices = {(n.device_id, n.kind): n for n in notices}
        self._last_seen = dict(last_seen or {})
        return self.pending_deadlines()

    def pending_deadlines(self) -> list[ScheduleDeadline]:
        return [
            ScheduleDeadline(c.id, c.deadline.kind, c.deadline.due_at)
            for c in sorted(self._cases.values(), key=lambda c: c.id)
            if c.deadline is not None
        ]

    def _index(self, case: Case) -> None:
        self._cases[case.id] = case
        if case.open:
            self._open[case.device_id] = case.id
        else:
            if self._open.get(case.device_id) == case.id:
                del self._open[case.device_id]
            if case.state is CaseState.RESOLVED:
                old = self._resolved.get(case.device_id)
                if old is not None and old != case.id:
                    # Only the latest resolved case can take a rating.
                    self._cases.pop(old, None)
                self._resolved[case.device_id] = case.id
            else:
                # Cancelled: persisted by the caller of _put, then forgotten.
                del self._cases[case.id]

    def _put(self, out: _Out, old: Case | None, new: Case) -> Case:
        out.touch(old, new)
        self._index(new)
        return new

    def _move(
        self,
        out: _Out,
        case: Case,
        now: float,
        to: CaseState,
        cause: str,
        detail: str = "",
        **changes: Any,
    ) -> Case:
        transition = Transition(now, case.state, to, cause, detail)
        new = replace(case, state=to, transitions=(*case.transitions, transition), **changes)
        return self._put(out, case, new)

    # --- events ----------------------------------------------------------

    def handle(self, event: DeskEvent, now: float) -> list[Action]:
        out = _Out()
        if isinstance(event, KeyPressed):
            self._seen(out, event.device_id, now)
            self._key(out, event, now)
        elif isinstance(event, HeartbeatReceived):
            self._seen(out, event.device_id, now)
            self._battery(out, event, now)
        elif isinstance(event, PersonAnswered):
            self._answer(out, event, now)
        elif isinstance(event, DeadlineDue):
            self._deadline(out, event, now)
        elif isinstance(event, NotifyFailed):
            self._notify_failed(out, event, now)
        elif isinstance(event, Tick):
            self._tick(out, now)
        else:
            out.outward.append(Rejected(type(event).__name__, "not an event the desk knows"))
        return out.actions()

    # key presses

    def _key(self, out: _Out, event: KeyPressed, now: float) -> None:
        if f"{event.device_id}-{event.counter}" in self._cases:
            # The press that opened a case, fed again after a restart.
            out.outward.append(Rejected("KeyPressed", "press already handled"))
            return
        case = self.open_case(event.device_id)
        if event.key is Key.CALL:
            if case is None:
                self._open_new(out, event, now)
            else:
                self._green_again(out, case, event, now)
        elif event.key is Key.HANGUP:
            if case is not None:
                self._red(out, case, event, now)
        else:
            self._rate(out, event, now)

    def _open_new(self, out: _Out, event: KeyPressed, now: float) -> None:
        case_id = f"{event.device_id}-{event.counter}"
        caller = self._caller(event.device_id)
        detail = f"{caller.resident} {caller.address}".strip()
        if event.device_id not in self.village.callers:
            detail = f"unknown caller {event.device_id}"
        case = Case(
            id=case_id,
            device_id=event.device_id,
            counter=event.counter,
            opened_at=now,
            state=CaseState.OPENED,
            grid=caller.grid,
            last_green_at=now,
            transitions=(Transition(now, None, CaseState.OPENED, "green", detail),),
        )
        self._put(out, None, case)
        case = self._advance(out, case, now, "dispatch", MessageKind.CALL)
        self._feedback(out, case)

    def _green_again(self, out: _Out, case: Case, event: KeyPressed, now: float) -> None:
        repress = self.village.settings.urgent_repress_s
        if now - case.last_green_at < repress:
            # A resident may press five times in a row; one escalation per
            # burst, or the whole chain would be burnt through in seconds.
            self._move(out, case, now, case.state, "green_again", f"within {repress:g} s")
            return
        case = self._move(
            out, case, now, case.state, "green_again", "urgent", urgent=True, last_green_at=now
        )
        if case.state in (CaseState.OPENED, CaseState.NOTIFYING):
            case = self._advance(out, case, now, "urgent", MessageKind.URGENT_CALL)
        elif case.state is CaseState.UNANSWERED:
            case = self._realarm(out, case, now, "urgent")
        elif case.state is CaseState.ACCEPTED and case.accepted_by is not None:
            self._tell(out, case.accepted_by, case, MessageKind.URGENT_CALL)
        self._feedback(out, case)

    def _red(self, out: _Out, case: Case, event: KeyPressed, now: float) -> None:
        within = now - case.opened_at <= self.village.settings.cancel_window_s
        if within and case.state is not CaseState.ON_SITE:
            told = case.notified
            case = self._move(
                out,
                case,
                now,
                CaseState.CANCELLED,
                "red",
                "cancelled by the resident",
                current=None,
                deadline=None,
            )
            for person in told:
                self._tell(out, person, case, MessageKind.CANCELLED)
            out.outward.append(SetCallerFeedback(case.device_id, _FB_CANCELLED))
        else:
            # The resident has put the phone down, not withdrawn the call: an
            # elderly person hanging up is no proof that help is not needed.
            self._move(out, case, now, case.state, "red", "call ended; case stays open")

    def _rate(self, out: _Out, event: KeyPressed, now: float) -> None:
        value = RatingValue.UP if event.key is Key.UP else RatingValue.DOWN
        target = self._ratable(event.device_id, now)
        if target is not None and any(
            r.counter == event.counter and r.device_id == event.device_id for r in target.ratings
        ):
            out.outward.append(Rejected("KeyPressed", "rating press already counted"))
            return
        rating = Rating(
            value, now, event.device_id, event.counter, None if target is None else target.id
        )
        if target is None:
            caller = self._caller(event.device_id)
            out.records.append(
                RecordForDistrict(
                    "general_feedback",
                    {
                        "device_id": event.device_id,
                        "counter": event.counter,
                        "value": value.value,
                        "at": now,
                        "resident": caller.resident,
                        "grid": caller.grid,
                    },
                )
            )
        else:
            replaced = f", replaces {target.rating.value}" if target.rating else ""
            changes: dict[str, Any] = {"rating": rating, "ratings": (*target.ratings, rating)}
            if value is RatingValue.DOWN and target.follow_up is None:
                leaders = self._grid_staff(target.grid, Role.GRID_LEADER)
                changes["follow_up"] = FollowUp(target.id, now, leaders)
            case = self._move(
                out, target, now, target.state, "rated", value.value + replaced, **changes
            )
            if case.follow_up is not None and target.follow_up is None:
                for person in case.follow_up.assigned_to:
                    self._tell(out, person, case, MessageKind.FOLLOW_UP)
                out.records.append(
                    RecordForDistrict(
                        "follow_up",
                        {
                            "case_id": case.id,
                            "opened_at": now,
                            "assigned_to": list(case.follow_up.assigned_to),
                            "grid": case.grid,
                        },
                    )
                )
        open_case = self.open_case(event.device_id)
        # THANKS falls back to an unlit LED after its hold time, which would
        # hide a call still in progress; then the beep is the thanks.
        fb = _FB_THANKS if open_case is None else caller_feedback(open_case)
        out.outward.append(SetCallerFeedback(event.device_id, fb))

    def _ratable(self, device_id: int, now: float) -> Case | None:
        case_id = self._resolved.get(device_id)
        if case_id is None:
            return None
        case = self._cases[case_id]
        assert case.resolved_at is not None
        if now - case.resolved_at > self.village.settings.rating_window_s:
            return None
        return case

    # people's answers

    def _answer(self, out: _Out, event: PersonAnswered, now: float) -> None:
        person = self.village.people.get(event.person_id)
        case = self._cases.get(event.case_id)
        if person is None:
            out.outward.append(Rejected("PersonAnswered", f"unknown person {event.person_id!r}"))
            return
        if case is None or not case.open:
            out.outward.append(Rejected("PersonAnswered", f"case {event.case_id!r} is not open"))
            return
        note = f"{person.name}: {event.note}".rstrip(": ")
        answer = event.answer
        if answer == "accept":
            self._accept(out, case, person, now, note)
        elif answer == "decline":
            if case.state is CaseState.NOTIFYING and case.current == person.id:
                self._advance(out, case, now, "declined", MessageKind.CALL, note)
            else:
                self._move(out, case, now, case.state, "declined", note)
        elif answer == "arrived":
            if case.state is CaseState.ON_SITE:
                return
            taken = case.state in WAITING_STATES
            case = self._move(
                out,
                case,
                now,
                CaseState.ON_SITE,
                "arrived",
                note,
                on_site_at=now,
                current=None,
                deadline=None,
                failed_channels=(),
                accepted_by=case.accepted_by or person.id,
                accepted_at=case.accepted_at if case.accepted_at is not None else now,
            )
            if taken:
                self._tell_taken(out, case, person.id)
            self._feedback(out, case)
        elif answer == "resolved":
            taken = case.state in WAITING_STATES
            case = self._move(
                out,
                case,
                now,
                CaseState.RESOLVED,
                "resolved",
                note,
                resolved_at=now,
                resolved_by=person.id,
                current=None,
                deadline=None,
                failed_channels=(),
                accepted_by=case.accepted_by or person.id,
                accepted_at=case.accepted_at if case.accepted_at is not None else now,
            )
            if taken:
                self._tell_taken(out, case, person.id)
            out.outward.append(SetCallerFeedback(case.device_id, _FB_IDLE))
        else:
            out.outward.append(Rejected("PersonAnswered", f"unknown answer {answer!r}"))

    def _accept(self, out: _Out, case: Case, person: Person, now: float, note: str) -> None:
        if case.state not in WAITING_STATES:
            if case.accepted_by != person.id:
                # Tell a late helper not to set out: someone else is on the way.
                self._tell(out, person.id, case, MessageKind.TAKEN)
            return
        notified = tuple(dict.fromkeys((*case.notified, person.id)))
        case = self._move(
            out,
            case,
            now,
            CaseState.ACCEPTED,
            "accepted",
            note,
            accepted_by=person.id,
            accepted_at=now,
            current=None,
            failed_channels=(),
            notified=notified,
            deadline=Deadline(DeadlineKind.MUST_COME, now + self.village.settings.must_come_s),
        )
        self._tell_taken(out, case, person.id)
        self._feedback(out, case)

    # timers

    def _deadline(self, out: _Out, event: DeadlineDue, now: float) -> None:
        case = self._cases.get(event.case_id)
        if case is None or case.deadline is None or not case.open:
            out.outward.append(Rejected("DeadlineDue", f"case {event.case_id!r} has no deadline"))
            return
        due = case.deadline
        if due.kind.value != event.kind or (
            event.due_at is not None and abs(event.due_at - due.due_at) > 1e-6
        ):
            out.outward.append(Rejected("DeadlineDue", f"stale timer for case {case.id}"))
            return
        self._fire(out, case, now)

    def _fire(self, out: _Out, case: Case, now: float) -> None:
        assert case.deadline is not None
        kind = case.deadline.kind
        settings = self.village.settings
        if kind is DeadlineKind.ACK:
            case = self._advance(out, case, now, "ack_timeout", MessageKind.CALL)
            self._feedback(out, case)
        elif kind is DeadlineKind.MUST_COME:
            case = self._move(
                out,
                case,
                now,
                case.state,
                "must_come_reminder",
                f"not on site after {settings.must_come_s:g} s",
                deadline=Deadline(DeadlineKind.MUST_COME_GRACE, now + settings.must_come_grace_s),
            )
            if case.accepted_by is not None:
                self._tell(out, case.accepted_by, case, MessageKind.MUST_COME_REMINDER)
        elif kind is DeadlineKind.MUST_COME_GRACE:
            late = case.accepted_by
            tried = case.tried if late is None or late in case.tried else (*case.tried, late)
            case = self._move(
                out,
                case,
                now,
                CaseState.NOTIFYING,
                "must_come_missed",
                f"{self._name(late)} did not arrive",
                accepted_by=None,
                accepted_at=None,
                tried=tried,
                current=None,
                deadline=None,
            )
            if late is not None:
                self._tell(out, late, case, MessageKind.ESCALATED)
            case = self._advance(out, case, now, "must_come_missed", MessageKind.URGENT_CALL)
            self._feedback(out, case)
        else:
            case = self._realarm(out, case, now, "realarm")
            self._feedback(out, case)

    def _advance(
        self,
        out: _Out,
        case: Case,
        now: float,
        cause: str,
        kind: MessageKind,
        note: str = "",
    ) -> Case:
        """Try the next person; if the chain is used up, raise the alarm."""
        tried = frozenset(case.tried) | ({case.current} if case.current else set())
        found = next_attempt(self.village.roster, now, case.grid, case.step, case.round, tried)
        if found is None:
            case = self._move(
                out,
                case,
                now,
                CaseState.UNANSWERED,
                cause,
                "chain exhausted; alarm to the town" + (f" ({note})" if note else ""),
                current=None,
                failed_channels=(),
                alarmed_at=case.alarmed_at if case.alarmed_at is not None else now,
                deadline=Deadline(DeadlineKind.REALARM, now + self.village.settings.realarm_s),
            )
            self._alarm_town(out, case, now)
            return case
        earlier = [*case.tried, *([case.current] if case.current else [])]
        kept = () if found.round != case.round else tuple(dict.fromkeys(earlier))
        new_tried = (*kept, found.person)
        notified = tuple(dict.fromkeys((*case.notified, found.person)))
        detail = f"step {found.step + 1}, pass {found.round + 1}: {self._name(found.person)}"
        case = self._move(
            out,
            case,
            now,
            CaseState.NOTIFYING,
            cause,
            detail + (f" ({note})" if note else ""),
            step=found.step,
            round=found.round,
            current=found.person,
            tried=new_tried,
            notified=notified,
            failed_channels=(),
            deadline=Deadline(DeadlineKind.ACK, now + found.timeout_s),
        )
        self._tell(out, found.person, case, MessageKind.URGENT_CALL if case.urgent else kind)
        return case

    def _realarm(self, out: _Out, case: Case, now: float, cause: str) -> Case:
        case = self._move(
            out,
            case,
            now,
            case.state,
            cause,
            "still unanswered; alarm again",
            deadline=Deadline(DeadlineKind.REALARM, now + self.village.settings.realarm_s),
        )
        self._alarm_town(out, case, now)
        # Whoever is first on duty now may not have been on duty when the chain
        # ran out (a shift has changed since): call them too.
        town = set(self.village.roster.exhausted_targets(now))
        steps = self.village.roster.escalation.steps
        if steps:
            for person in self.village.roster.step_candidates(steps[0], now, case.grid):
                if person not in town:
                    self._tell(out, person, case, MessageKind.URGENT_CALL)
        return case

    def _alarm_town(self, out: _Out, case: Case, now: float) -> None:
        targets = self.village.roster.exhausted_targets(now)
        for person in targets:
            self._tell(out, person, case, MessageKind.UNANSWERED_ALARM)
        # Also a district record of its own, so the alarm is seen even when
        # nobody at the town level can be reached by the gateway.
        out.records.append(
            RecordForDistrict(
                "unanswered_alarm",
                {
                    "case_id": case.id,
                    "device_id": case.device_id,
                    "grid": case.grid,
                    "opened_at": case.opened_at,
                    "at": now,
                    "told": list(targets),
                },
            )
        )

    def _notify_failed(self, out: _Out, event: NotifyFailed, now: float) -> None:
        try:
            channel = Channel(event.channel)
        except ValueError:
            out.outward.append(Rejected("NotifyFailed", f"unknown channel {event.channel!r}"))
            return
        try:
            along = tuple(Channel(c) for c in event.along)
        except ValueError:
            out.outward.append(Rejected("NotifyFailed", f"unknown channel in {event.along!r}"))
            return
        case = None if event.case_id is None else self._cases.get(event.case_id)
        if case is None or not case.open:
            out.records.append(
                RecordForDistrict(
                    "notify_failed",
                    {
                        "person_id": event.person_id,
                        "case_id": event.case_id,
                        "channel": channel.value,
                        "at": now,
                    },
                )
            )
            return
        detail = f"{self._name(event.person_id)} via {channel.value}"
        if event.reason:
            detail += f": {event.reason}"
        if case.state is CaseState.NOTIFYING and case.current == event.person_id:
            # A text that went with an unanswered call is on the phone, and an
            # accept by it later is still taken; it is no reason to keep the
            # resident waiting out the timeout for this person.
            failed = tuple(dict.fromkeys((*case.failed_channels, channel, *along)))
            person = self.village.people.get(event.person_id)
            if person is None or set(person.channels) <= set(failed):
                # Every way to reach this person has failed: waiting out the
                # timeout would be waiting for nobody.
                case = self._advance(out, case, now, "unreachable", MessageKind.CALL, detail)
                self._feedback(out, case)
                return
            self._move(out, case, now, case.state, "notify_failed", detail, failed_channels=failed)
            return
        self._move(out, case, now, case.state, "notify_failed", detail)

    # supervision

    def _tick(self, out: _Out, now: float) -> None:
        for case in sorted(self._cases.values(), key=lambda c: c.id):
            if case.deadline is not None and now - case.deadline.due_at >= TICK_LATE_S:
                self._fire(out, case, now)
        for device_id, case_id in list(self._resolved.items()):
            resolved_at = self._cases[case_id].resolved_at
            window = self.village.settings.rating_window_s
            if resolved_at is not None and now - resolved_at > window:
                del self._resolved[device_id]
                del self._cases[case_id]
        allowance = self.village.settings.heartbeat_allowance_s
        silent: list[tuple[bool, float, CallerInfo]] = []
        for device_id, caller in self.village.callers.items():
            last = self._last_seen.setdefault(device_id, now)
            if now - last > allowance and (device_id, NoticeKind.OFFLINE) not in self._notices:
                silent.append((not caller.lives_alone, last, caller))
        # Lives-alone residents first: nobody else in the house would notice.
        for _, last, caller in sorted(silent, key=lambda s: (s[0], s[1], s[2].device_id)):
            since = self._local(last)
            self._raise_notice(
                out,
                caller,
                NoticeKind.OFFLINE,
                last,
                MessageKind.CALLER_OFFLINE,
                f"silent since {since}",
            )

    def _seen(self, out: _Out, device_id: int, now: float) -> None:
        self._last_seen[device_id] = max(now, self._last_seen.get(device_id, now))
        notice = self._notices.pop((device_id, NoticeKind.OFFLINE), None)
        if notice is not None:
            out.notices.append(PersistNotice(notice, cleared=True))
            out.records.append(
                RecordForDistrict("notice_cleared", {**notice_to_dict(notice), "at": now})
            )
            caller = self._caller(device_id)
            for person in notice.notified:
                out.outward.append(self._notice_message(person, caller, MessageKind.CALLER_BACK))

    def _battery(self, out: _Out, event: HeartbeatReceived, now: float) -> None:
        pct = event.battery_pct
        threshold = self.village.settings.low_battery_pct
        low = event.low_battery or (pct is not None and pct <= threshold)
        key = (event.device_id, NoticeKind.LOW_BATTERY)
        if low and key not in self._notices:
            detail = f"{event.battery_mv} mV" + ("" if pct is None else f", {pct}%")
            caller = self._caller(event.device_id)
            self._raise_notice(
                out, caller, NoticeKind.LOW_BATTERY, now, MessageKind.LOW_BATTERY, detail
            )
        elif not low and key in self._notices:
            notice = self._notices.pop(key)
            out.notices.append(PersistNotice(notice, cleared=True))
            out.records.append(
                RecordForDistrict("notice_cleared", {**notice_to_dict(notice), "at": now})
            )

    def _raise_notice(
        self,
        out: _Out,
        caller: CallerInfo,
        kind: NoticeKind,
        since: float,
        message: MessageKind,
        detail: str,
    ) -> None:
        targets = self._grid_staff(caller.grid, Role.GRID_WORKER)
        notice = Notice(caller.device_id, kind, since, targets, detail)
        self._notices[(caller.device_id, kind)] = notice
        out.notices.append(PersistNotice(notice))
        out.records.append(RecordForDistrict("notice", notice_to_dict(notice)))
        for person in targets:
            out.outward.append(self._notice_message(person, caller, message, detail))

    # helpers

    def _caller(self, device_id: int) -> CallerInfo:
        return self.village.callers.get(device_id) or CallerInfo(device_id, f"#{device_id}")

    def _name(self, person_id: str | None) -> str:
        person = self.village.people.get(person_id or "")
        return person.name if person is not None else str(person_id)

    def _local(self, instant: float) -> str:
        return self.village.roster.local(instant).strftime("%m-%d %H:%M")

    def _grid_staff(self, grid: str | None, role: Role) -> tuple[str, ...]:
        """Reachable staff of a grid in ``role``, falling back to the grid
        leader and then the secretary so a notice always has someone to go to."""
        people = list(self.village.people.values())
        for wanted in dict.fromkeys((role, Role.GRID_LEADER)):
            found = tuple(
                p.id
                for p in people
                if p.role is wanted and grid is not None and grid in p.grids and p.reachable
            )
            if found:
                return found
        for wanted in (Role.SECRETARY, Role.DEPUTY):
            found = tuple(p.id for p in people if p.role is wanted and p.reachable)
            if found:
                return found
        return ()

    def _feedback(self, out: _Out, case: Case) -> None:
        out.outward.append(SetCallerFeedback(case.device_id, caller_feedback(case)))

    def _tell_taken(self, out: _Out, case: Case, by: str) -> None:
        for person in case.notified:
            if person != by:
                self._tell(out, person, case, MessageKind.TAKEN)

    def _tell(self, out: _Out, person_id: str, case: Case, kind: MessageKind) -> None:
        person = self.village.people.get(person_id)
        if person is None or not person.reachable:
            return
        caller = self._caller(case.device_id)
        out.outward.append(
            Notify(person.id, person.channels, case.id, kind, _case_text(self, kind, case, caller))
        )

    def _notice_message(
        self, person_id: str, caller: CallerInfo, kind: MessageKind, detail: str = ""
    ) -> Notify:
        person = self.village.people[person_id]
        where = f"{caller.resident}（{caller.address}{'，独居' if caller.lives_alone else ''}）"
        if kind is MessageKind.CALLER_OFFLINE:
            text = f"【呼叫器离线】{where}的呼叫器没有信号（{detail}），请上门查看。"
        elif kind is MessageKind.CALLER_BACK:
            text = f"【呼叫器恢复】{where}的呼叫器已恢复在线。"
        else:
            text = f"【电量低】{where}的呼叫器电量低（{detail}），请更换电池或检查电源。"
        return Notify(person.id, person.channels, None, kind, text)


def _resolved_key(case: Case) -> tuple[float, str]:
    return (case.resolved_at or 0.0, case.id)


_TEXT = {
    MessageKind.CALL: "【一键呼叫】{who}按了呼叫键，请回复“接单”或“不接”。{phone}",
    MessageKind.URGENT_CALL: "【紧急·一键呼叫】{who}再次按了呼叫键，请立即回复“接单”。{phone}",
    MessageKind.MUST_COME_REMINDER: "【请尽快到场】您已接单的{who}还在等您，到达后请回复“到达”。",
    MessageKind.TAKEN: "【已有人接单】{who}的呼叫已由{by}处理，您无需前往。",
    MessageKind.CANCELLED: "【呼叫已取消】{who}按红键取消了刚才的呼叫（可能是误按）。",
    MessageKind.ESCALATED: "【已转派】{who}的呼叫因超时未到场，已转派他人。如已到场请回复“到达”。",
    MessageKind.UNANSWERED_ALARM: (
        "【无人接单·请处置】{who}的呼叫无人接单，已通知全部值班人员。{phone}"
    ),
    MessageKind.FOLLOW_UP: "【回访】{who}对处理结果不满意，请安排回访。",
}


def _case_text(desk: Desk, kind: MessageKind, case: Case, caller: CallerInfo) -> str:
    alone = "，独居" if caller.lives_alone else ""
    who = f"{caller.resident}（{caller.address}{alone}）" if caller.address else caller.resident
    phone = f"电话 {caller.phone}。" if caller.phone else ""
    by = desk._name(case.accepted_by or case.resolved_by)
    opened = dt.datetime.fromtimestamp(case.opened_at, desk.village.roster.zone)
    template = _TEXT.get(kind, "{who}")
    return template.format(who=who, phone=phone, by=by) + f" [{case.id} {opened:%H:%M}]"
