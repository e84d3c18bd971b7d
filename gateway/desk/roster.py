"""Who answers a call at a given instant, and in which order people are tried.

Pure: plain frozen dataclasses in, tuples out; the instant is always passed in.

Shifts and overrides are written in the village's *wall-clock* time ("08:00"
means eight on the clock in the village office), so an instant is first turned
into local wall time with zoneinfo.  This makes daylight-saving changes come out
right by construction: on the spring-forward night the missing hour simply
never happens, and on the fall-back night the repeated hour is answered by the
same people twice, exactly as a printed duty rota would be read.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from zoneinfo import ZoneInfo

__all__ = [
    "DAY_NAMES",
    "Attempt",
    "Channel",
    "Duty",
    "Escalation",
    "Override",
    "OverrideAction",
    "Person",
    "Role",
    "Roster",
    "Shift",
    "Step",
    "StepKind",
    "next_attempt",
]

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60


class Role(StrEnum):
    SECRETARY = "secretary"
    DEPUTY = "deputy"
    GRID_LEADER = "grid_leader"
    GRID_WORKER = "grid_worker"
    TOWN_DUTY = "town_duty"

    @property
    def grid_bound(self) -> bool:
        """Grid staff answer for their own grids only."""
        return self in (Role.GRID_LEADER, Role.GRID_WORKER)


class Channel(StrEnum):
    APP = "app"
    SMS = "sms"
    VOICE = "voice"


@dataclass(frozen=True, slots=True)
class Person:
    id: str
    name: str
    role: Role
    phone: str = ""
    app_id: str | None = None
    grids: tuple[str, ...] = ()
    channels: tuple[Channel, ...] = ()  # in order of preference
    app_key: bytes | None = field(default=None, repr=False)  # signs the app's answers

    @property
    def reachable(self) -> bool:
        # The config loader guarantees every listed channel has its address,
        # so a person is reachable exactly when some channel is listed.
        return bool(self.channels)


@dataclass(frozen=True, slots=True)
class Shift:
    """A weekly duty: on each of ``days`` from ``start`` to ``end`` (minutes after
    midnight).  ``end <= start`` runs past midnight into the next day; ``end ==
    start`` is a full 24 hours.  Exactly one of ``person`` and ``role`` is set."""

    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: int
    end: int
    person: str | None = None
    role: Role | None = None
    order: int = 0

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Wrapping (or 24 h) shift: the evening part belongs to the day it
        # starts on, the early-morning part to the day after.
        if weekday in self.days and minute >= self.start:
            return True
        return (weekday - 1) % 7 in self.days and minute < self.end


class OverrideAction(StrEnum):
    OFF = "off"  # leave: the person does not answer in the window
    REPLACE = "replace"  # ``by`` answers wherever ``person`` would have
    EXTRA = "extra"  # ``person`` answers in addition to the rota


@dataclass(frozen=True, slots=True)
class Override:
    date: dt.date
    action: OverrideAction
    person: str
    by: str | None = None
    start: int | None = None  # None: from midnight
    end: int | None = None  # None: to the next midnight
    order: int = 100  # for EXTRA: after the regular rota unless told otherwise
    note: str = ""

    def window(self) -> tuple[dt.datetime, dt.datetime]:
        """The naive local wall-clock interval [from, to) the override applies to."""
        start = self.start or 0
        begin = dt.datetime.combine(self.date, dt.time()) + dt.timedelta(minutes=start)
        if self.end is None:
            end = dt.datetime.combine(self.date + dt.timedelta(days=1), dt.time())
        else:
            end = dt.datetime.combine(self.date, dt.time()) + dt.timedelta(minutes=self.end)
            if self.end <= start:
                end += dt.timedelta(days=1)
        return begin, end


class StepKind(StrEnum):
    ON_DUTY = "on_duty"  # whoever the roster says, in roster order
    ROLE = "role"  # those on duty in that role
    PERSON = "person"  # one named person, on duty or not


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    ack_timeout_s: float
    role: Role | None = None
    person: str | None = None


@dataclass(frozen=True, slots=True)
class Escalation:
    steps: tuple[Step, ...]
    repeat: int = 1  # extra passes over the chain after the first
    exhausted_role: Role | None = Role.TOWN_DUTY
    exhausted_person: str | None = None

    @property
    def rounds(self) -> int:
        return self.repeat + 1


@dataclass(frozen=True, slots=True)
class Duty:
    """One person on duty, in the slot of ``as_role`` serving ``grids``.

    A replacement stands in the slot of the person replaced: a deputy covering
    the secretary's leave is found by a ``role = "secretary"`` step and serves
    the replaced grid leader's grids."""

    person: str
    as_role: Role
    grids: tuple[str, ...]

    def serves(self, grid: str | None) -> bool:
        return not self.as_role.grid_bound or (grid is not None and grid in self.grids)


@dataclass(frozen=True, slots=True)
class Attempt:
    """Try ``person`` as the answer to ``step`` of pass ``round``; wait ``timeout_s``."""

    person: str
    step: int
    round: int
    timeout_s: float


@dataclass(frozen=True)
class Roster:
    timezone: str
    shifts: tuple[Shift, ...]
    overrides: tuple[Override, ...]
    escalation: Escalation
    people: Mapping[str, Person]

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local(self, instant: float) -> dt.datetime:
        """The naive local wall-clock time of a Unix instant."""
        return dt.datetime.fromtimestamp(instant, self.zone).replace(tzinfo=None)

    def on_duty(self, instant: float) -> tuple[Duty, ...]:
        return self.on_duty_local(self.local(instant))

    def on_duty_local(self, wall: dt.datetime) -> tuple[Duty, ...]:
        """Who is on duty at a naive local wall-clock time, in answering order."""
        weekday, minute = wall.weekday(), wall.hour * 60 + wall.minute
        # (order, sequence, duty): sorting on the first two keeps simultaneous
        # entries in file order, and lets an extra with a low order go first.
        ranked: list[tuple[int, int, Duty]] = []
        seq = itertools.count()
        for shift in self.shifts:
            if not shift.covers(weekday, minute):
                continue
            for person in self._shift_people(shift):
                slot_role = shift.role if shift.role is not None else person.role
                ranked.append((shift.order, next(seq), Duty(person.id, slot_role, person.grids)))
        for ov in self.overrides:
            begin, end = ov.window()
            if not begin <= wall < end:
                continue
            if ov.action is OverrideAction.OFF:
                ranked = [r for r in ranked if r[2].person != ov.person]
            elif ov.action is OverrideAction.REPLACE and ov.by is not None:
                ranked = [
                    (o, s, Duty(ov.by, d.as_role, d.grids) if d.person == ov.person else d)
                    for o, s, d in ranked
                ]
            elif (helper := self.people.get(ov.person)) is not None:
                ranked.append((ov.order, next(seq), Duty(helper.id, helper.role, helper.grids)))
        ranked.sort(key=lambda r: r[:2])
        duties = [r[2] for r in ranked]
        seen: set[str] = set()
        unique: list[Duty] = []
        for duty in duties:
            # One person in two slots answers once, in the earlier slot.
            if duty.person not in seen:
                seen.add(duty.person)
                unique.append(duty)
        return tuple(unique)

    def _shift_people(self, shift: Shift) -> Iterable[Person]:
        if shift.person is not None:
            person = self.people.get(shift.person)
            return () if person is None else (person,)
        return (p for p in self.people.values() if p.role == shift.role)

    def step_candidates(self, step: Step, instant: float, grid: str | None) -> tuple[str, ...]:
        """The people a step would try at ``instant`` for a resident of ``grid``,
        in order, leaving out anyone who cannot be reached."""
        if step.kind is StepKind.PERSON:
            ids: tuple[str, ...] = (step.person,) if step.person else ()
        else:
            duties = self.on_duty(instant)
            ids = tuple(
                d.person
                for d in duties
                if d.serves(grid) and (step.kind is StepKind.ON_DUTY or d.as_role == step.role)
            )
        return tuple(i for i in ids if (p := self.people.get(i)) is not None and p.reachable)

    def exhausted_targets(self, instant: float) -> tuple[str, ...]:
        """Whom to raise the "unanswered" alarm with: the named person, or the
        role's people on duty, or (nobody of it on duty) everyone in the role:
        the alarm must reach the town level whatever its rota says."""
        esc = self.escalation
        if esc.exhausted_person is not None:
            ids: tuple[str, ...] = (esc.exhausted_person,)
        elif esc.exhausted_role is not None:
            role = esc.exhausted_role
            ids = tuple(d.person for d in self.on_duty(instant) if d.as_role == role)
            if not ids:
                ids = tuple(p.id for p in self.people.values() if p.role == role)
        else:
            ids = ()
        return tuple(i for i in ids if (p := self.people.get(i)) is not None and p.reachable)

    def escalation_sequence(self, instant: float, grid: str | None) -> tuple[Attempt, ...]:
        """Every attempt a case opened at ``instant`` would make if nobody ever
        answered and the rota did not change meanwhile (for display and tests;
        the desk asks :func:`next_attempt` one step at a time, at the time of
        each step, so a shift change during an escalation is honoured)."""
        attempts: list[Attempt] = []
        step, rnd, tried = 0, 0, frozenset[str]()
        while (found := next_attempt(self, instant, grid, step, rnd, tried)) is not None:
            if found.round != rnd:
                tried = frozenset()
            attempts.append(found)
            step, rnd, tried = found.step, found.round, tried | {found.person}
        return tuple(attempts)


def next_attempt(
    roster: Roster,
    instant: float,
    grid: str | None,
    step: int,
    round_: int,
    tried: frozenset[str],
) -> Attempt | None:
    """The next person to try, starting at ``step`` of pass ``round_`` and skipping
    anyone already tried in that pass; ``None`` once every pass is used up.

    Steps with nobody on duty or nobody reachable are passed over at once, so no
    timeout is ever waited out for nobody.  A later pass starts afresh: people
    who did not answer the first time are tried again.
    """
    steps = roster.escalation.steps
    while round_ < roster.escalation.rounds:
        while step < len(steps):
            for person in roster.step_candidates(steps[step], instant, grid):
                if person not in tried:
                    return Attempt(person, step, round_, steps[step].ack_timeout_s)
            step += 1
        round_, step, tried = round_ + 1, 0, frozenset()
    return None
