"""The village's people and duty roster: pydantic models at the boundary,
plain dataclasses for the call desk, and the coverage proof staff run before
trusting a new rota.

``people.toml`` lists grids and people; ``roster.toml`` says who answers when
and how a call escalates.  :func:`load_village` turns both (plus the residents
file) into a :class:`gateway.desk.Village`; :func:`check_coverage` proves that
the result leaves no minute without someone to answer.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .config import ConfigError, ResidentsFile, load_model
from .desk.model import CallerInfo, Settings, Village
from .desk.roster import (
    DAY_NAMES,
    MINUTES_PER_DAY,
    Channel,
    Escalation,
    Override,
    OverrideAction,
    Person,
    Role,
    Roster,
    Shift,
    Step,
    StepKind,
)

__all__ = [
    "EscalationModel",
    "PeopleFile",
    "PersonModel",
    "RosterFile",
    "check_coverage",
    "load_people",
    "load_roster",
    "load_village",
]

# The alarm-trigger standard's ceiling: a caller silent for a day is offline.
MAX_HEARTBEAT_ALLOWANCE_S = 86400

Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
RoleName = Literal["secretary", "deputy", "grid_leader", "grid_worker", "town_duty"]
ChannelName = Literal["app", "sms", "voice"]
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")
_PHONE = re.compile(r"^\+?[0-9][0-9 -]{4,19}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _minutes(value: str) -> int:
    if not _TIME.match(value):
        raise ValueError(f'time must be "HH:MM" from 00:00 to 24:00, got {value!r}')
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


def _check_time(value: str | None, info: ValidationInfo) -> str | None:
    if value is not None:
        _minutes(value)
        if value == "24:00" and info.field_name == "start":
            raise ValueError('a start time of "24:00" is "00:00" of the next day')
    return value


# --- people.toml -----------------------------------------------------------


class GridModel(_Model):
    id: Slug
    name: str = ""


class PersonModel(_Model):
    id: Slug
    name: Annotated[str, Field(min_length=1)]
    role: RoleName
    phone: str = ""
    app_id: str | None = None
    # The secret the person's app signs its answers with (32 hex digits or
    # more): without it anyone on the broker could "accept" a call and stop
    # the escalation while nobody comes.
    app_key: str | None = None
    grids: list[str] = []
    channels: list[ChannelName] = []

    @field_validator("app_key")
    @classmethod
    def _hex_key(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ValueError("app_key must be hexadecimal digits") from None
        if len(raw) < 16:
            raise ValueError(f"app_key must be at least 32 hex digits, got {len(value)}")
        return value.lower()

    @field_validator("phone")
    @classmethod
    def _phone_digits(cls, value: str) -> str:
        if value and not _PHONE.match(value):
            raise ValueError(f"phone must be digits (optionally +, spaces, -), got {value!r}")
        return value

    @field_validator("channels")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a channel is listed twice: {value}")
        return value

    @model_validator(mode="after")
    def _addresses(self) -> Self:
        # A channel without its address would fail at 3 a.m.; fail here instead.
        for channel in self.channels:
            if channel in ("sms", "voice") and not self.phone:
                raise ValueError(f"channel {channel!r} needs a phone number (phone = ...)")
            if channel == "app" and not (self.app_id and self.app_key):
                raise ValueError("channel 'app' needs an app_id and its app_key")
        if self.role in ("grid_leader", "grid_worker") and not self.grids:
            raise ValueError(f"a {self.role} needs grids = [...] naming the grids served")
        return self


class PeopleFile(_Model):
    grid: list[GridModel] = []
    person: list[PersonModel] = []


# --- roster.toml -----------------------------------------------------------


class ShiftModel(_Model):
    days: Annotated[list[str], Field(min_length=1)]
    start: str
    end: str
    person: str | None = None
    role: RoleName | None = None
    order: int = 0

    @field_validator("days")
    @classmethod
    def _day_names(cls, value: list[str]) -> list[str]:
        days = [d.lower() for d in value]
        if days == ["daily"]:
            return list(DAY_NAMES)
        bad = [d for d in days if d not in DAY_NAMES]
        if bad:
            raise ValueError(f"unknown day {bad[0]!r}: use {', '.join(DAY_NAMES)} or 'daily'")
        return days

    @field_validator("start", "end")
    @classmethod
    def _times(cls, value: str, info: ValidationInfo) -> str | None:
        return _check_time(value, info)

    @model_validator(mode="after")
    def _who(self) -> Self:
        if (self.person is None) == (self.role is None):
            raise ValueError("a shift names exactly one of person = ... or role = ...")
        return self


class OverrideModel(_Model):
    date: dt.date
    action: Literal["off", "replace", "extra"]
    person: str
    by: str | None = None
    start: str | None = None
    end: str | None = None
    order: int = 100
    note: str = ""

    @field_validator("start", "end")
    @classmethod
    def _times(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_time(value, info)

    @model_validator(mode="after")
    def _replacement(self) -> Self:
        if self.action == "replace" and not self.by:
            raise ValueError('action "replace" needs by = "<person id>" (who stands in)')
        if self.action != "replace" and self.by:
            raise ValueError(f'by = ... goes only with action "replace", not {self.action!r}')
        return self


class StepModel(_Model):
    role: RoleName | None = None
    person: str | None = None
    on_duty: bool = False
    ack_timeout_s: Annotated[float, Field(ge=10, le=3600)] = 120

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if sum((self.role is not None, self.person is not None, self.on_duty)) != 1:
            raise ValueError("a step names exactly one of role, person or on_duty = true")
        return self


class ExhaustedModel(_Model):
    role: RoleName | None = None
    person: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.role is None) == (self.person is None):
            raise ValueError("escalation.exhausted names exactly one of role or person")
        return self


class EscalationModel(_Model):
    step: Annotated[list[StepModel], Field(min_length=1)]
    repeat: Annotated[int, Field(ge=0, le=10)] = 1
    exhausted: ExhaustedModel = ExhaustedModel(role="town_duty")


class RosterFile(_Model):
    timezone: str = "Asia/Shanghai"
    must_come_s: Annotated[float, Field(ge=60, le=6 * 3600)] = 1800
    must_come_grace_s: Annotated[float, Field(ge=0, le=3600)] = 600
    cancel_window_s: Annotated[float, Field(ge=0, le=120)] = 10
    rating_window_s: Annotated[float, Field(ge=60, le=30 * 86400)] = 86400
    heartbeat_allowance_s: Annotated[float, Field(ge=60, le=MAX_HEARTBEAT_ALLOWANCE_S)] = 3600
    low_battery_pct: Annotated[int, Field(ge=0, le=100)] = 20
    realarm_s: Annotated[float, Field(ge=60, le=86400)] = 900
    urgent_repress_s: Annotated[float, Field(ge=0, le=600)] = 30
    shift: Annotated[list[ShiftModel], Field(min_length=1)]
    override: list[OverrideModel] = []
    escalation: EscalationModel

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. Asia/Shanghai)") from None
        return value


# --- loading ---------------------------------------------------------------


def load_people(path: Path) -> PeopleFile:
    return load_model(path, PeopleFile)


def load_roster(path: Path) -> RosterFile:
    return load_model(path, RosterFile)


def _cross_check(people: PeopleFile, roster: RosterFile, pp: Path, rp: Path) -> list[str]:
    """References between the files, checked before anything is built."""
    problems: list[str] = []
    grid_ids = [g.id for g in people.grid]
    ids = [p.id for p in people.person]
    for dup in sorted({g for g in grid_ids if grid_ids.count(g) > 1}):
        problems.append(f"{pp}: grid[id={dup}]: grid id appears more than once")
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{pp}: person[id={dup}]: person id appears more than once")
    known = set(ids)
    for p in people.person:
        for g in p.grids:
            if g not in grid_ids:
                problems.append(
                    f"{pp}: person[id={p.id}].grids: unknown grid, add a [[grid]] (value: {g!r})"
                )

    def ref(where: str, person: str | None) -> None:
        if person is not None and person not in known:
            problems.append(f"{rp}: {where}: no such person in {pp.name} (value: {person!r})")

    for i, s in enumerate(roster.shift):
        ref(f"shift[{i}].person", s.person)
    for o in roster.override:
        ref(f"override[date={o.date}].person", o.person)
        ref(f"override[date={o.date}].by", o.by)
    for i, st in enumerate(roster.escalation.step):
        ref(f"escalation.step[{i}].person", st.person)
    ref("escalation.exhausted.person", roster.escalation.exhausted.person)
    return problems


def load_village(
    people_path: Path | str,
    roster_path: Path | str,
    residents: ResidentsFile,
    *,
    name: str = "",
    residents_source: str = "residents.toml",
) -> Village:
    """Read people.toml and roster.toml and build the desk's view of the village.

    Raises :class:`ConfigError` listing every problem found in either file.
    """
    pp, rp = Path(people_path), Path(roster_path)
    problems: list[str] = []
    people_file = roster_file = None
    try:
        people_file = load_people(pp)
    except ConfigError as exc:
        problems += exc.problems
    try:
        roster_file = load_roster(rp)
    except ConfigError as exc:
        problems += exc.problems
    if people_file is None or roster_file is None:
        raise ConfigError(problems)
    problems = _cross_check(people_file, roster_file, pp, rp)
    if problems:
        raise ConfigError(problems)

    people = {
        p.id: Person(
            id=p.id,
            name=p.name,
            role=Role(p.role),
            phone=p.phone,
            app_id=p.app_id,
            app_key=bytes.fromhex(p.app_key) if p.app_key else None,
            grids=tuple(p.grids),
            channels=tuple(Channel(c) for c in p.channels),
        )
        for p in people_file.person
    }
    r = roster_file
    shifts = tuple(
        Shift(
            days=frozenset(DAY_NAMES.index(d) for d in s.days),
            start=_minutes(s.start),
            end=_minutes(s.end) % MINUTES_PER_DAY if s.end == "24:00" else _minutes(s.end),
            person=s.person,
            role=None if s.role is None else Role(s.role),
            order=s.order,
        )
        for s in r.shift
    )
    overrides = tuple(
        Override(
            date=o.date,
            action=OverrideAction(o.action),
            person=o.person,
            by=o.by,
            start=None if o.start is None else _minutes(o.start),
            end=None if o.end is None else _minutes(o.end),
            order=o.order,
            note=o.note,
        )
        for o in r.override
    )
    steps = tuple(
        Step(
            kind=StepKind.ON_DUTY if s.on_duty else StepKind.PERSON if s.person else StepKind.ROLE,
            ack_timeout_s=s.ack_timeout_s,
            role=None if s.role is None else Role(s.role),
            person=s.person,
        )
        for s in r.escalation.step
    )
    exhausted = r.escalation.exhausted
    escalation = Escalation(
        steps=steps,
        repeat=r.escalation.repeat,
        exhausted_role=None if exhausted.role is None else Role(exhausted.role),
        exhausted_person=exhausted.person,
    )
    roster = Roster(r.timezone, shifts, overrides, escalation, people)
    settings = Settings(
        must_come_s=r.must_come_s,
        must_come_grace_s=r.must_come_grace_s,
        cancel_window_s=r.cancel_window_s,
        rating_window_s=r.rating_window_s,
        heartbeat_allowance_s=r.heartbeat_allowance_s,
        low_battery_pct=r.low_battery_pct,
        realarm_s=r.realarm_s,
        urgent_repress_s=r.urgent_repress_s,
    )
    callers = {
        c.id: CallerInfo(
            device_id=c.id,
            resident=c.resident,
            address=c.address,
            grid=c.grid or None,
            phone=c.phone,
            lives_alone=c.lives_alone,
        )
        for c in residents.caller
    }
    return Village(
        name=name,
        people=people,
        grids={g.id: g.name for g in people_file.grid},
        roster=roster,
        settings=settings,
        callers=callers,
        people_source=str(pp),
        roster_source=str(rp),
        residents_source=residents_source,
    )


# --- coverage --------------------------------------------------------------


def _ranges(minutes: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive minutes folded into [first, last] ranges."""
    start = prev = None
    for m in minutes:
        if prev is not None and m == prev + 1:
            prev = m
            continue
        if start is not None and prev is not None:
            yield start, prev
        start = prev = m
    if start is not None and prev is not None:
        yield start, prev


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _gaps(roster: Roster, day: dt.date, with_overrides: bool) -> list[int]:
    plain = roster if with_overrides else _without_overrides(roster)
    midnight = dt.datetime.combine(day, dt.time())
    return [
        m
        for m in range(MINUTES_PER_DAY)
        if not plain.on_duty_local(midnight + dt.timedelta(minutes=m))
    ]


def _without_overrides(roster: Roster) -> Roster:
    return Roster(roster.timezone, roster.shifts, (), roster.escalation, roster.people)


def check_coverage(village: Village, start: dt.datetime) -> list[str]:
    """Problems that would leave a call without anyone to answer it; empty if none.

    Checks every minute of the weekly rota, every minute of each date from
    ``start`` on that has an override (at least the next 7 days are looked
    at), that everyone the rota or the chain names can be reached, and that
    every caller's grid exists and has a grid leader.
    """
    problems: list[str] = []
    roster = village.roster
    rp, pp, res = village.roster_source, village.people_source, village.residents_source
    local_start = (
        start.astimezone(roster.zone).replace(tzinfo=None) if start.tzinfo is not None else start
    )

    # The weekly rota on its own, one representative date per weekday.
    monday = local_start.date() - dt.timedelta(days=local_start.weekday())
    for offset in range(7):
        day = monday + dt.timedelta(days=offset)
        for a, b in _ranges(_gaps(roster, day, with_overrides=False)):
            problems.append(
                f"{rp}: shift: nobody on duty on {DAY_NAMES[day.weekday()]} "
                f"{_hhmm(a)}-{_hhmm(b)} (value: no shift covers it)"
            )

    # Dated overrides: the next 7 days, and any later override date too.
    first = local_start.date()
    days = {first + dt.timedelta(days=i) for i in range(8)}
    days |= {o.date for o in roster.overrides if o.date >= first}
    days |= {o.date + dt.timedelta(days=1) for o in roster.overrides if o.date >= first}
    override_days = {o.date for o in roster.overrides} | {
        o.date + dt.timedelta(days=1) for o in roster.overrides
    }
    for day in sorted(days & override_days):
        for a, b in _ranges(_gaps(roster, day, with_overrides=True)):
            names = ", ".join(
                f"{o.action.value} {o.person}"
                for o in roster.overrides
                if o.date in (day, day - dt.timedelta(days=1))
            )
            problems.append(
                f"{rp}: override[date={day}]: nobody on duty on {day} "
                f"{_hhmm(a)}-{_hhmm(b)} (value: {names})"
            )

    # Everyone the rota or the chain may call must be reachable.
    named: dict[str, str] = {}
    for i, s in enumerate(roster.shifts):
        if s.person is not None:
            named.setdefault(s.person, f"shift[{i}].person")
        else:
            for p in village.people.values():
                if p.role == s.role:
                    named.setdefault(p.id, f"shift[{i}].role")
    for o in roster.overrides:
        named.setdefault(o.person, f"override[date={o.date}].person")
        if o.by is not None:
            named.setdefault(o.by, f"override[date={o.date}].by")
    esc = roster.escalation
    for i, st in enumerate(esc.steps):
        if st.person is not None:
            named.setdefault(st.person, f"escalation.step[{i}].person")
        elif st.role is not None and not any(p.role == st.role for p in village.people.values()):
            problems.append(
                f"{rp}: escalation.step[{i}].role: nobody in {pp} has this role "
                f"(value: {st.role.value!r})"
            )
    if esc.exhausted_person is not None:
        named.setdefault(esc.exhausted_person, "escalation.exhausted.person")
    elif esc.exhausted_role is not None:
        holders = [p for p in village.people.values() if p.role == esc.exhausted_role]
        if not any(p.reachable for p in holders):
            problems.append(
                f"{rp}: escalation.exhausted.role: nobody reachable has this role, the "
                f"'unanswered' alarm would reach no one (value: {esc.exhausted_role.value!r})"
            )
        for p in holders:
            named.setdefault(p.id, "escalation.exhausted.role")
    for person_id, where in named.items():
        person = village.people.get(person_id)
        if person is None:
            problems.append(f"{rp}: {where}: no such person in {pp} (value: {person_id!r})")
        elif not person.reachable:
            problems.append(
                f"{pp}: person[id={person_id}].channels: no channel to reach this person, "
                f"named in {rp} {where} (value: [])"
            )

    # Every caller's grid exists and has a grid leader (one message per grid).
    leaders = {g for p in village.people.values() if p.role is Role.GRID_LEADER for g in p.grids}
    by_grid: dict[str | None, list[int]] = {}
    for caller in sorted(village.callers.values(), key=lambda c: c.device_id):
        by_grid.setdefault(caller.grid, []).append(caller.device_id)
    for grid, devices in by_grid.items():
        first_id = devices[0]
        more = f" and {len(devices) - 1} more" if len(devices) > 1 else ""
        if grid is None:
            problems.append(f"{res}: caller[id={first_id}].grid: no grid given{more} (value: '')")
        elif grid not in village.grids:
            problems.append(
                f"{res}: caller[id={first_id}].grid: no such [[grid]] in {pp}{more} "
                f"(value: {grid!r})"
            )
        elif grid not in leaders:
            problems.append(
                f"{pp}: grid[id={grid}]: no grid_leader serves this grid, needed by "
                f"caller {first_id}{more} in {res} (value: {grid!r})"
            )
    return list(dict.fromkeys(problems))
