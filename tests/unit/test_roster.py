"""Who is on duty when: week boundaries, shifts past midnight, overrides, time zones."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.desk.roster import (
    Attempt,
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

MON, TUE, SAT, SUN = 0, 1, 5, 6
ALL = frozenset(range(7))


def people(*extra: Person) -> dict[str, Person]:
    base = [
        Person("a", "甲", Role.SECRETARY, "1", None, (), (Channel.SMS,)),
        Person("b", "乙", Role.DEPUTY, "2", None, (), (Channel.SMS,)),
        Person("c", "丙", Role.GRID_LEADER, "3", None, ("grid-1",), (Channel.VOICE,)),
        Person("d", "丁", Role.GRID_LEADER, "4", None, ("grid-2",), (Channel.VOICE,)),
        *extra,
    ]
    return {p.id: p for p in base}


def roster(
    shifts: tuple[Shift, ...],
    overrides: tuple[Override, ...] = (),
    tz: str = "Asia/Shanghai",
    steps: tuple[Step, ...] = (Step(StepKind.ON_DUTY, 60),),
    repeat: int = 0,
    who: dict[str, Person] | None = None,
) -> Roster:
    return Roster(tz, shifts, overrides, Escalation(steps, repeat), who or people())


def at(r: Roster, y: int, m: int, d: int, hh: int, mm: int) -> tuple[str, ...]:
    """People on duty at a local wall time."""
    instant = dt.datetime(y, m, d, hh, mm, tzinfo=ZoneInfo(r.timezone)).timestamp()
    return tuple(d.person for d in r.on_duty(instant))


def utc(y: int, m: int, d: int, hh: int, mm: int = 0) -> float:
    return dt.datetime(y, m, d, hh, mm, tzinfo=dt.UTC).timestamp()


# 2026-11-23 is a Monday; 2026-11-29 a Sunday.


def test_day_shift_boundaries_are_start_inclusive_end_exclusive() -> None:
    r = roster((Shift(ALL, 8 * 60, 20 * 60, person="a"),))
    assert at(r, 2026, 11, 23, 7, 59) == ()
    assert at(r, 2026, 11, 23, 8, 0) == ("a",)
    assert at(r, 2026, 11, 23, 19, 59) == ("a",)
    assert at(r, 2026, 11, 23, 20, 0) == ()


def test_a_night_shift_wraps_past_midnight_into_the_next_day() -> None:
    r = roster((Shift(frozenset({MON}), 20 * 60, 8 * 60, person="b"),))
    assert at(r, 2026, 11, 23, 19, 59) == ()
    assert at(r, 2026, 11, 23, 20, 0) == ("b",)
    assert at(r, 2026, 11, 24, 7, 59) == ("b",)  # Tuesday morning belongs to Monday's shift
    assert at(r, 2026, 11, 24, 8, 0) == ()
    assert at(r, 2026, 11, 24, 20, 0) == ()  # Tuesday has no shift of its own


def test_a_sunday_night_shift_crosses_the_week_boundary() -> None:
    r = roster((Shift(frozenset({SUN}), 22 * 60, 6 * 60, person="b"),))
    assert at(r, 2026, 11, 29, 23, 0) == ("b",)
    assert at(r, 2026, 11, 30, 5, 59) == ("b",)  # Monday of the next week
    assert at(r, 2026, 11, 30, 6, 0) == ()
    assert at(r, 2026, 11, 23, 5, 0) == ("b",)  # and the Monday before, from the Sunday before


def test_equal_start_and_end_is_a_full_day_and_weekday_sets_are_respected() -> None:
    r = roster((Shift(frozenset({SAT, SUN}), 0, 0, person="a"),))
    assert at(r, 2026, 11, 28, 0, 0) == ("a",)
    assert at(r, 2026, 11, 29, 23, 59) == ("a",)
    assert at(r, 2026, 11, 30, 0, 0) == ()
    assert at(r, 2026, 11, 27, 23, 59) == ()


def test_simultaneous_entries_follow_order_then_file_order() -> None:
    r = roster(
        (
            Shift(ALL, 0, 0, role=Role.GRID_LEADER, order=5),
            Shift(ALL, 0, 0, person="b", order=1),
            Shift(ALL, 0, 0, person="a", order=1),
        )
    )
    assert at(r, 2026, 11, 23, 12, 0) == ("b", "a", "c", "d")


def test_override_off_replace_and_extra() -> None:
    day = dt.date(2026, 12, 1)
    base = (Shift(ALL, 8 * 60, 20 * 60, person="a"), Shift(ALL, 20 * 60, 8 * 60, person="b"))
    leave = roster(base, (Override(day, OverrideAction.OFF, "a", start=8 * 60, end=12 * 60),))
    assert at(leave, 2026, 12, 1, 9, 0) == ()
    assert at(leave, 2026, 12, 1, 12, 0) == ("a",)
    assert at(leave, 2026, 12, 2, 9, 0) == ("a",)  # only that date

    swap = roster(base, (Override(day, OverrideAction.REPLACE, "a", by="b"),))
    assert at(swap, 2026, 12, 1, 9, 0) == ("b",)
    assert at(swap, 2026, 11, 30, 9, 0) == ("a",)
    # The stand-in takes the slot: a role=secretary lookup finds them.
    instant = dt.datetime(2026, 12, 1, 9, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    assert swap.on_duty(instant)[0].as_role is Role.SECRETARY
    assert swap.step_candidates(Step(StepKind.ROLE, 60, role=Role.SECRETARY), instant, None) == (
        "b",
    )

    extra = roster(base, (Override(day, OverrideAction.EXTRA, "c", start=18 * 60, end=2 * 60),))
    assert at(extra, 2026, 12, 1, 19, 0) == ("a", "c")
    assert at(extra, 2026, 12, 2, 1, 59) == ("b", "c")  # the window wraps past midnight
    assert at(extra, 2026, 12, 2, 2, 0) == ("b",)
    first = roster(base, (Override(day, OverrideAction.EXTRA, "c", order=-1),))
    assert at(first, 2026, 12, 1, 9, 0) == ("c", "a")


def test_asia_shanghai_has_no_daylight_saving() -> None:
    r = roster((Shift(ALL, 8 * 60, 20 * 60, person="a"), Shift(ALL, 20 * 60, 8 * 60, person="b")))
    # Monday 23:59 UTC is Tuesday 07:59 in Shanghai, all year round.
    for month in (1, 4, 7, 10):
        midnight = dt.datetime(2026, month, 5, tzinfo=dt.UTC)
        assert tuple(d.person for d in r.on_duty(midnight.timestamp() - 60)) == ("b",)
        assert tuple(d.person for d in r.on_duty(midnight.timestamp())) == ("a",)


def test_europe_berlin_spring_forward() -> None:
    # 2025-03-30: 02:00 CET jumps to 03:00 CEST.  Night until 03:00, day after.
    r = roster(
        (Shift(ALL, 22 * 60, 3 * 60, person="b"), Shift(ALL, 3 * 60, 22 * 60, person="a")),
        tz="Europe/Berlin",
    )
    assert tuple(d.person for d in r.on_duty(utc(2025, 3, 30, 0, 59))) == ("b",)  # 01:59 CET
    # One second later on the clock it is 03:00 CEST: a fixed +1 h offset would
    # still say 02:00 and keep the night person on.
    assert tuple(d.person for d in r.on_duty(utc(2025, 3, 30, 1, 0))) == ("a",)
    # The summer offset holds for the rest of the day: 22:00 CEST is 20:00 UTC.
    assert tuple(d.person for d in r.on_duty(utc(2025, 3, 30, 19, 59))) == ("a",)
    assert tuple(d.person for d in r.on_duty(utc(2025, 3, 30, 20, 0))) == ("b",)


def test_europe_berlin_fall_back() -> None:
    # 2025-10-26: 03:00 CEST falls back to 02:00 CET; 02:xx happens twice.
    r = roster(
        (Shift(ALL, 22 * 60, 3 * 60, person="b"), Shift(ALL, 3 * 60, 22 * 60, person="a")),
        tz="Europe/Berlin",
    )
    assert tuple(d.person for d in r.on_duty(utc(2025, 10, 26, 0, 30))) == ("b",)  # 02:30 CEST
    assert tuple(d.person for d in r.on_duty(utc(2025, 10, 26, 1, 30))) == ("b",)  # 02:30 CET
    assert tuple(d.person for d in r.on_duty(utc(2025, 10, 26, 2, 0))) == ("a",)  # 03:00 CET
    assert tuple(d.person for d in r.on_duty(utc(2025, 10, 26, 20, 59))) == ("a",)  # 21:59 CET
    assert tuple(d.person for d in r.on_duty(utc(2025, 10, 26, 21, 0))) == ("b",)  # 22:00 CET


def test_escalation_skips_empty_steps_dedupes_within_a_pass_and_repeats() -> None:
    steps = (
        Step(StepKind.ROLE, 60, role=Role.DEPUTY),  # nobody: the deputy is off by day
        Step(StepKind.ROLE, 90, role=Role.SECRETARY),
        Step(StepKind.ON_DUTY, 120),  # a again (skipped), then grid-1's leader only
        Step(StepKind.PERSON, 30, person="b"),
    )
    r = roster(
        (Shift(ALL, 8 * 60, 20 * 60, person="a"), Shift(ALL, 0, 0, role=Role.GRID_LEADER)),
        steps=steps,
        repeat=1,
    )
    noon = dt.datetime(2026, 11, 23, 12, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
    assert r.escalation_sequence(noon, "grid-1") == (
        Attempt("a", 1, 0, 90),
        Attempt("c", 2, 0, 120),
        Attempt("b", 3, 0, 30),
        Attempt("a", 1, 1, 90),
        Attempt("c", 2, 1, 120),
        Attempt("b", 3, 1, 30),
    )
    # A resident without a grid is not sent to a grid leader.
    assert [a.person for a in r.escalation_sequence(noon, None)] == ["a", "b", "a", "b"]


def test_unreachable_people_are_left_out_and_the_alarm_falls_back_to_the_role() -> None:
    who = people(
        Person("mute", "哑", Role.SECRETARY, "", None, (), ()),
        Person("town", "镇", Role.TOWN_DUTY, "9", None, (), (Channel.VOICE,)),
    )
    r = roster((Shift(ALL, 0, 0, person="mute"),), who=who)
    assert r.escalation_sequence(utc(2026, 11, 23, 4), None) == ()
    # Town duty is on no village rota, yet the alarm must reach it.
    assert r.exhausted_targets(utc(2026, 11, 23, 4)) == ("town",)


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 24 * 60 - 1),
    length=st.integers(1, 24 * 60),
    days=st.frozensets(st.integers(0, 6), min_size=1),
    offset_min=st.integers(0, 14 * 24 * 60),
)
def test_a_shift_covers_exactly_its_minutes(
    start: int, length: int, days: frozenset[int], offset_min: int
) -> None:
    end = (start + length) % (24 * 60)
    r = roster((Shift(days, start, end, person="a"),))
    wall = dt.datetime(2026, 11, 23) + dt.timedelta(minutes=offset_min)
    # Brute force: the shift started on some listed day at most one day ago.
    minute_of_week = wall.weekday() * 1440 + wall.hour * 60 + wall.minute
    expected = any(0 <= (minute_of_week - (d * 1440 + start)) % (7 * 1440) < length for d in days)
    assert bool(r.on_duty_local(wall)) == expected
