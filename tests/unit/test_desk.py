"""The call desk's rules, one test each, with an injected clock (docs/desk.md)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from zoneinfo import ZoneInfo

import pytest

from firmware_protocol import CallerState, Key
from gateway.desk import (
    Action,
    CallerInfo,
    CancelDeadline,
    Case,
    CaseState,
    Channel,
    DeadlineKind,
    Desk,
    DeskSnapshot,
    Escalation,
    MessageKind,
    Notice,
    NoticeKind,
    Notify,
    PersistCase,
    PersistNotice,
    RatingValue,
    RecordForDistrict,
    Rejected,
    Role,
    Roster,
    ScheduleDeadline,
    SetCallerFeedback,
    Settings,
    Shift,
    Step,
    StepKind,
    Village,
)
from gateway.desk.roster import Person
from gateway.events import (
    DeadlineDue,
    DeskEvent,
    HeartbeatReceived,
    KeyPressed,
    NotifyFailed,
    PersonAnswered,
    Tick,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
# Tuesday 2026-11-24 10:00 in the village: the secretary's day shift.
T = dt.datetime(2026, 11, 24, 10, 0, tzinfo=SHANGHAI).timestamp()
NIGHT = dt.datetime(2026, 11, 25, 3, 0, tzinfo=SHANGHAI).timestamp()
ALL_DAYS = frozenset(range(7))


def make_village(
    people: Mapping[str, Person] | None = None, settings: Settings | None = None
) -> Village:
    """A small village: secretary by day, deputy by night, one grid leader and
    one grid worker for grid-1 around the clock, a town duty officer."""
    staff = {
        "sec": Person(
            "sec", "王书记", Role.SECRETARY, "139001", "app-sec", (), (Channel.APP, Channel.SMS)
        ),
        "dep": Person("dep", "李副书记", Role.DEPUTY, "139002", None, (), (Channel.SMS,)),
        "gl1": Person(
            "gl1", "张网格长", Role.GRID_LEADER, "139003", None, ("grid-1",), (Channel.VOICE,)
        ),
        "gw1": Person(
            "gw1", "赵网格员", Role.GRID_WORKER, "139004", None, ("grid-1",), (Channel.SMS,)
        ),
        "town": Person("town", "镇值班", Role.TOWN_DUTY, "0564", None, (), (Channel.VOICE,)),
    }
    staff.update(people or {})
    shifts = (
        Shift(ALL_DAYS, 8 * 60, 20 * 60, person="sec"),
        Shift(ALL_DAYS, 20 * 60, 8 * 60, person="dep"),
        Shift(ALL_DAYS, 0, 0, role=Role.GRID_LEADER, order=5),
    )
    escalation = Escalation(
        steps=(
            Step(StepKind.ROLE, 120, role=Role.SECRETARY),
            Step(StepKind.ON_DUTY, 120),
            Step(StepKind.PERSON, 180, person="sec"),
        ),
        repeat=1,
    )
    roster = Roster("Asia/Shanghai", shifts, (), escalation, staff)
    callers = {
        1001: CallerInfo(1001, "王建国", "第1网格 44号", "grid-1", "1590001", False),
        1002: CallerInfo(1002, "李玉兰", "第1网格 41号", "grid-1", "1590002", True),
        1003: CallerInfo(1003, "徐凤英", "第1网格 51号", "grid-1", "", False),
    }
    grids = {"grid-1": "第1网格"}
    return Village("小王村", staff, grids, roster, settings or Settings(), callers)


class Keys:
    """Counters per device, so each press is a new event as intake guarantees."""

    def __init__(self) -> None:
        self.counters: dict[int, int] = {}

    def press(self, device: int, key: Key, now: float) -> KeyPressed:
        self.counters[device] = self.counters.get(device, 0) + 1
        return KeyPressed(device, self.counters[device], "serial:bus1", now, True, key)


def heartbeat(
    device: int, now: float, *, low: bool = False, pct: int | None = 80
) -> HeartbeatReceived:
    return HeartbeatReceived(device, 0, "mqtt", now, True, 3000, pct, -70, False, low)


def notifies(actions: Sequence[Action], kind: MessageKind | None = None) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and (kind is None or a.kind is kind)]


def feedback_states(actions: Sequence[Action]) -> list[CallerState]:
    return [a.feedback.state for a in actions if isinstance(a, SetCallerFeedback)]


def persisted(actions: Sequence[Action]) -> list[Case]:
    return [a.case for a in actions if isinstance(a, PersistCase)]


def schedules(actions: Sequence[Action]) -> list[ScheduleDeadline]:
    return [a for a in actions if isinstance(a, ScheduleDeadline)]


def fire(desk: Desk, case_id: str, now: float | None = None) -> list[Action]:
    deadline = desk.cases[case_id].deadline
    assert deadline is not None
    when = deadline.due_at if now is None else now
    return desk.handle(DeadlineDue(case_id, deadline.kind.value, deadline.due_at), when)


@pytest.fixture
def desk() -> Desk:
    return Desk(make_village())


@pytest.fixture
def keys() -> Keys:
    return Keys()


def open_case(desk: Desk, keys: Keys, device: int = 1001, now: float = T) -> str:
    desk.handle(keys.press(device, Key.CALL, now), now)
    case = desk.open_case(device)
    assert case is not None
    return case.id


# --- green -------------------------------------------------------------------


def test_green_opens_a_case_and_notifies_the_first_person_on_duty(desk: Desk, keys: Keys) -> None:
    actions = desk.handle(keys.press(1001, Key.CALL, T), T)

    [case] = persisted(actions)
    assert case.id == "1001-1"
    assert case.state is CaseState.NOTIFYING
    assert [(t.from_state, t.to_state, t.cause) for t in case.transitions] == [
        (None, CaseState.OPENED, "green"),
        (CaseState.OPENED, CaseState.NOTIFYING, "dispatch"),
    ]
    [notify] = notifies(actions)
    assert (notify.person_id, notify.kind, notify.channels) == (
        "sec",
        MessageKind.CALL,
        (Channel.APP, Channel.SMS),
    )
    assert "王建国" in notify.text
    assert "1001-1" in notify.text
    assert schedules(actions) == [ScheduleDeadline("1001-1", DeadlineKind.ACK, T + 120)]
    assert feedback_states(actions) == [CallerState.RECEIVED]
    records = [a for a in actions if isinstance(a, RecordForDistrict) and a.kind == "case"]
    assert records[0].payload["state"] == "notifying"


def test_accept_shows_help_coming_and_starts_the_must_come_clock(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(PersonAnswered("sec", case_id, "accept", "马上到", T + 30), T + 30)

    [case] = persisted(actions)
    assert (case.state, case.accepted_by, case.accepted_at) == (CaseState.ACCEPTED, "sec", T + 30)
    assert feedback_states(actions) == [CallerState.HELP_COMING]
    assert schedules(actions) == [ScheduleDeadline(case_id, DeadlineKind.MUST_COME, T + 30 + 1800)]
    assert "马上到" in case.transitions[-1].detail


def test_green_again_marks_urgent_and_escalates_at_once(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(keys.press(1001, Key.CALL, T + 40), T + 40)

    case = desk.cases[case_id]
    assert case.urgent
    assert case.current == "gl1"
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [("gl1", MessageKind.URGENT_CALL)]
    assert schedules(actions) == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 40 + 120)]
    assert feedback_states(actions) == [CallerState.STILL_TRYING]

    # A burst of presses escalates once, not once per press.
    again = desk.handle(keys.press(1001, Key.CALL, T + 45), T + 45)
    assert desk.cases[case_id].current == "gl1"
    assert not notifies(again)
    assert desk.cases[case_id].transitions[-1].cause == "green_again"


def test_red_within_the_cancel_window_cancels_and_tells_those_notified(
    desk: Desk, keys: Keys
) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(keys.press(1001, Key.HANGUP, T + 5), T + 5)

    [case] = persisted(actions)
    assert case.state is CaseState.CANCELLED
    assert case.transitions[-1].cause == "red"
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [("sec", MessageKind.CANCELLED)]
    assert CancelDeadline(case_id) in actions
    assert feedback_states(actions) == [CallerState.CANCELLED]
    assert desk.open_case(1001) is None
    # Still on record for the district, not erased.
    assert any(isinstance(a, RecordForDistrict) and a.payload["id"] == case_id for a in actions)


def test_red_after_the_cancel_window_ends_the_call_but_keeps_the_case(
    desk: Desk, keys: Keys
) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(keys.press(1001, Key.HANGUP, T + 11), T + 11)

    case = desk.cases[case_id]
    assert case.state is CaseState.NOTIFYING
    assert case.transitions[-1].cause == "red"
    assert not schedules(actions)
    assert not notifies(actions)
    assert case.deadline is not None
    assert case.deadline.due_at == T + 120


# --- escalation --------------------------------------------------------------


def test_ack_timeout_moves_to_the_next_step(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    actions = fire(desk, case_id)

    case = desk.cases[case_id]
    assert (case.current, case.step, case.round) == ("gl1", 1, 0)
    assert case.transitions[-1].cause == "ack_timeout"
    assert [n.person_id for n in notifies(actions)] == ["gl1"]
    assert schedules(actions) == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 240)]


def test_a_stale_timer_is_ignored(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    fire(desk, case_id)  # now waiting for gl1 until T + 240
    actions = desk.handle(DeadlineDue(case_id, "ack", T + 120), T + 121)
    assert [type(a) for a in actions] == [Rejected]
    assert desk.cases[case_id].current == "gl1"


def test_decline_moves_on_at_once(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(PersonAnswered("sec", case_id, "decline", "在县里", T + 20), T + 20)

    case = desk.cases[case_id]
    assert case.current == "gl1"
    assert case.transitions[-1].cause == "declined"
    assert schedules(actions) == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 20 + 120)]


def test_a_step_with_nobody_on_duty_is_skipped_without_waiting(desk: Desk, keys: Keys) -> None:
    # 03:00: the secretary is off duty, so step 1 (role secretary) has nobody.
    case_id = open_case(desk, keys, now=NIGHT)
    case = desk.cases[case_id]
    assert (case.current, case.step) == ("dep", 1)
    assert case.deadline is not None
    assert case.deadline.due_at == NIGHT + 120


def test_a_person_nobody_can_reach_is_skipped() -> None:
    mute = Person("sec", "王书记", Role.SECRETARY, "", None, (), ())
    desk = Desk(make_village(people={"sec": mute}))
    case_id = open_case(desk, Keys())
    assert desk.cases[case_id].current == "gl1"


def test_every_channel_failing_at_once_moves_on_at_once(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    first = desk.handle(NotifyFailed("sec", case_id, "app"), T + 1)
    # One channel left (sms): keep waiting for it.
    assert desk.cases[case_id].current == "sec"
    assert desk.cases[case_id].failed_channels == (Channel.APP,)
    assert not schedules(first)

    second = desk.handle(NotifyFailed("sec", case_id, "sms"), T + 2)
    case = desk.cases[case_id]
    assert case.current == "gl1"
    assert case.transitions[-1].cause == "unreachable"
    assert schedules(second) == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 2 + 120)]


def test_a_call_nobody_picked_up_moves_on_despite_the_text_sent_with_it(keys: Keys) -> None:
    caller = Person(
        "sec", "王书记", Role.SECRETARY, "139001", None, (), (Channel.VOICE, Channel.SMS)
    )
    desk = Desk(make_village(people={"sec": caller}))
    case_id = open_case(desk, keys)
    actions = desk.handle(NotifyFailed("sec", case_id, "voice", "no_answer", ("sms",)), T + 40)
    case = desk.cases[case_id]
    assert case.current == "gl1"
    assert case.transitions[-1].cause == "unreachable"
    assert "王书记 via voice: no_answer" in case.transitions[-1].detail
    assert schedules(actions) == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 40 + 120)]


def test_a_call_nobody_picked_up_waits_for_channels_not_yet_tried(keys: Keys) -> None:
    caller = Person(
        "sec", "王书记", Role.SECRETARY, "139001", "app-sec", (),
        (Channel.VOICE, Channel.SMS, Channel.APP),
    )  # fmt: skip
    desk = Desk(make_village(people={"sec": caller}))
    case_id = open_case(desk, keys)
    desk.handle(NotifyFailed("sec", case_id, "voice", "busy", ("sms",)), T + 10)
    case = desk.cases[case_id]
    assert case.current == "sec"  # the app took it: wait for an answer there
    assert set(case.failed_channels) == {Channel.VOICE, Channel.SMS}
    desk.handle(NotifyFailed("sec", case_id, "app"), T + 11)
    assert desk.cases[case_id].current == "gl1"


def test_notify_failed_with_an_unknown_along_channel_is_rejected(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    actions = desk.handle(NotifyFailed("sec", case_id, "app", "busy", ("fax",)), T + 1)
    assert [a.reason for a in actions if isinstance(a, Rejected)] == [
        "unknown channel in ('fax',)"
    ]
    assert desk.cases[case_id].failed_channels == ()


def test_an_exhausted_chain_repeats_then_raises_the_unanswered_alarm(
    desk: Desk, keys: Keys
) -> None:
    case_id = open_case(desk, keys)
    tried = [desk.cases[case_id].current]
    for _ in range(10):
        actions = fire(desk, case_id)
        case = desk.cases[case_id]
        if case.state is CaseState.UNANSWERED:
            break
        tried.append(case.current)
    # Two passes (repeat = 1) over sec, then gl1 (sec's own step is a repeat).
    assert tried == ["sec", "gl1", "sec", "gl1"]
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [
        ("town", MessageKind.UNANSWERED_ALARM)
    ]
    alarm = [
        a for a in actions if isinstance(a, RecordForDistrict) and a.kind == "unanswered_alarm"
    ]
    assert alarm
    assert alarm[0].payload["case_id"] == case_id
    assert case.deadline is not None
    assert case.deadline.kind is DeadlineKind.REALARM
    assert feedback_states(actions) == [CallerState.STILL_TRYING]

    # Never dropped: the alarm repeats, and anyone may still take the case.
    again = fire(desk, case_id)
    assert {n.person_id for n in notifies(again)} == {"town", "sec"}
    taken = desk.handle(PersonAnswered("town", case_id, "accept", "", 0), case.deadline.due_at + 5)
    assert desk.cases[case_id].state is CaseState.ACCEPTED
    assert feedback_states(taken) == [CallerState.HELP_COMING]


def test_nobody_reachable_at_all_alarms_at_once() -> None:
    mute = {
        pid: Person(pid, pid, role, "", None, grids, ())
        for pid, role, grids in (
            ("sec", Role.SECRETARY, ()),
            ("dep", Role.DEPUTY, ()),
            ("gl1", Role.GRID_LEADER, ("grid-1",)),
        )
    }
    desk = Desk(make_village(people=mute))
    actions = desk.handle(Keys().press(1001, Key.CALL, T), T)
    [case] = persisted(actions)
    assert case.state is CaseState.UNANSWERED
    assert [n.person_id for n in notifies(actions)] == ["town"]


def test_not_on_site_in_time_reminds_then_escalates(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    desk.handle(PersonAnswered("sec", case_id, "accept", "", T + 10), T + 10)

    reminder = fire(desk, case_id)
    assert [(n.person_id, n.kind) for n in notifies(reminder)] == [
        ("sec", MessageKind.MUST_COME_REMINDER)
    ]
    case = desk.cases[case_id]
    assert case.state is CaseState.ACCEPTED
    assert case.deadline is not None
    assert case.deadline.kind is DeadlineKind.MUST_COME_GRACE

    moved = fire(desk, case_id)
    case = desk.cases[case_id]
    assert case.state is CaseState.NOTIFYING
    assert case.accepted_by is None
    assert case.current == "gl1"
    assert [(n.person_id, n.kind) for n in notifies(moved)] == [
        ("sec", MessageKind.ESCALATED),
        ("gl1", MessageKind.URGENT_CALL),
    ]
    # The late secretary can still report arriving.
    now = case.transitions[-1].at + 60
    arrived = desk.handle(PersonAnswered("sec", case_id, "arrived", "", now), now)
    assert desk.cases[case_id].state is CaseState.ON_SITE
    assert [(n.person_id, n.kind) for n in notifies(arrived)] == [("gl1", MessageKind.TAKEN)]


def test_two_callers_pressing_at_the_same_moment_are_two_cases(desk: Desk, keys: Keys) -> None:
    a = desk.handle(keys.press(1001, Key.CALL, T), T)
    b = desk.handle(keys.press(1002, Key.CALL, T), T)
    assert [c.id for c in persisted(a)] == ["1001-1"]
    assert [c.id for c in persisted(b)] == ["1002-1"]
    assert len(notifies(b)) == 1  # the second is dispatched at once, not queued
    desk.handle(PersonAnswered("sec", "1001-1", "accept", "", T + 1), T + 1)
    assert desk.cases["1002-1"].state is CaseState.NOTIFYING
    assert desk.cases["1002-1"].deadline is not None


def test_a_second_accept_is_told_the_case_is_taken(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    desk.handle(PersonAnswered("sec", case_id, "accept", "", T + 10), T + 10)
    actions = desk.handle(PersonAnswered("gl1", case_id, "accept", "", T + 11), T + 11)
    assert desk.cases[case_id].accepted_by == "sec"
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [("gl1", MessageKind.TAKEN)]
    assert not persisted(actions)


def test_arrive_and_resolve(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    desk.handle(PersonAnswered("sec", case_id, "accept", "", T + 10), T + 10)
    on_site = desk.handle(PersonAnswered("sec", case_id, "arrived", "", T + 600), T + 600)
    assert feedback_states(on_site) == [CallerState.ON_SITE]
    assert CancelDeadline(case_id) in on_site
    done = desk.handle(PersonAnswered("sec", case_id, "resolved", "修好了灯", T + 900), T + 900)
    [case] = persisted(done)
    assert (case.state, case.resolved_by, case.resolved_at) == (CaseState.RESOLVED, "sec", T + 900)
    assert feedback_states(done) == [CallerState.IDLE]
    assert desk.open_case(1001) is None
    causes = [t.cause for t in case.transitions]
    assert causes == ["green", "dispatch", "accepted", "arrived", "resolved"]


def test_answers_that_fit_no_open_case_are_rejected(desk: Desk, keys: Keys) -> None:
    assert isinstance(desk.handle(PersonAnswered("sec", "9-9", "accept"), T)[0], Rejected)
    case_id = open_case(desk, keys)
    assert isinstance(desk.handle(PersonAnswered("nobody", case_id, "accept"), T)[0], Rejected)
    assert isinstance(desk.handle(PersonAnswered("sec", case_id, "maybe"), T)[0], Rejected)


def test_tick_fires_a_deadline_whose_timer_was_lost(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    assert not persisted(desk.handle(Tick(), T + 121))  # the timer itself is due first
    actions = desk.handle(Tick(), T + 130)
    assert desk.cases[case_id].current == "gl1"
    assert schedules(actions)


# --- ratings -----------------------------------------------------------------


def resolve(desk: Desk, keys: Keys, device: int = 1001, now: float = T) -> str:
    case_id = open_case(desk, keys, device, now)
    desk.handle(PersonAnswered("sec", case_id, "accept", "", now + 10), now + 10)
    desk.handle(PersonAnswered("sec", case_id, "resolved", "", now + 600), now + 600)
    return case_id


def test_thumbs_up_attaches_to_the_latest_resolved_case(desk: Desk, keys: Keys) -> None:
    first = resolve(desk, keys)
    second = resolve(desk, keys, now=T + 3600)
    actions = desk.handle(keys.press(1001, Key.UP, T + 7200), T + 7200)
    [case] = persisted(actions)
    assert case.id == second != first
    assert case.rating is not None
    assert case.rating.value is RatingValue.UP
    assert case.rating.case_id == second
    assert feedback_states(actions) == [CallerState.THANKS]


def test_thumbs_down_opens_a_follow_up_for_the_grid_leader(desk: Desk, keys: Keys) -> None:
    case_id = resolve(desk, keys)
    actions = desk.handle(keys.press(1001, Key.DOWN, T + 3600), T + 3600)
    case = desk.cases[case_id]
    assert case.follow_up is not None
    assert case.follow_up.assigned_to == ("gl1",)
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [("gl1", MessageKind.FOLLOW_UP)]
    assert any(isinstance(a, RecordForDistrict) and a.kind == "follow_up" for a in actions)


def test_a_rating_with_no_case_is_kept_as_general_feedback(desk: Desk, keys: Keys) -> None:
    actions = desk.handle(keys.press(1003, Key.DOWN, T), T)
    [record] = [a for a in actions if isinstance(a, RecordForDistrict)]
    assert record.kind == "general_feedback"
    assert record.payload["value"] == "down"
    assert record.payload["device_id"] == 1003
    assert not persisted(actions)


def test_a_rating_after_the_window_is_general_feedback(desk: Desk, keys: Keys) -> None:
    resolve(desk, keys)
    late = T + 600 + Settings().rating_window_s + 1
    actions = desk.handle(keys.press(1001, Key.UP, late), late)
    assert [a.kind for a in actions if isinstance(a, RecordForDistrict)] == ["general_feedback"]


def test_a_second_rating_replaces_the_first_and_both_are_kept(desk: Desk, keys: Keys) -> None:
    case_id = resolve(desk, keys)
    desk.handle(keys.press(1001, Key.DOWN, T + 700), T + 700)
    actions = desk.handle(keys.press(1001, Key.UP, T + 800), T + 800)
    case = desk.cases[case_id]
    assert case.rating is not None
    assert case.rating.value is RatingValue.UP
    assert [r.value for r in case.ratings] == [RatingValue.DOWN, RatingValue.UP]
    assert case.follow_up is not None  # the follow-up stays: someone was unhappy
    assert not notifies(actions, MessageKind.FOLLOW_UP)
    assert "replaces down" in case.transitions[-1].detail


def test_a_rating_during_an_open_case_keeps_the_call_display(desk: Desk, keys: Keys) -> None:
    open_case(desk, keys)
    actions = desk.handle(keys.press(1001, Key.UP, T + 5), T + 5)
    assert feedback_states(actions) == [CallerState.RECEIVED]


# --- supervision -------------------------------------------------------------


def test_silent_callers_are_reported_offline_lives_alone_first(desk: Desk) -> None:
    desk.handle(Tick(), T)  # supervision starts counting from here
    actions = desk.handle(Tick(), T + 3601)
    offline = notifies(actions, MessageKind.CALLER_OFFLINE)
    assert [n.person_id for n in offline] == ["gw1"] * 3
    # 1002 lives alone: reported first.
    assert "李玉兰" in offline[0].text
    assert "独居" in offline[0].text
    assert next(a.notice.device_id for a in actions if isinstance(a, PersistNotice)) == 1002
    # Reported once, not on every tick.
    assert not notifies(desk.handle(Tick(), T + 3700))


def test_a_heartbeat_clears_the_offline_notice(desk: Desk) -> None:
    desk.handle(Tick(), T)
    desk.handle(Tick(), T + 3601)
    actions = desk.handle(heartbeat(1002, T + 4000), T + 4000)
    assert [(n.person_id, n.kind) for n in notifies(actions)] == [("gw1", MessageKind.CALLER_BACK)]
    cleared = [a for a in actions if isinstance(a, PersistNotice)]
    assert cleared
    assert cleared[0].cleared
    assert {n.device_id for n in desk.notices} == {1001, 1003}


def test_low_battery_is_reported_once_and_cleared(desk: Desk) -> None:
    low = desk.handle(heartbeat(1001, T, pct=15), T)
    assert [n.kind for n in notifies(low)] == [MessageKind.LOW_BATTERY]
    assert not notifies(desk.handle(heartbeat(1001, T + 60, low=True, pct=None), T + 60))
    ok = desk.handle(heartbeat(1001, T + 120, pct=90), T + 120)
    assert [a.cleared for a in ok if isinstance(a, PersistNotice)] == [True]
    assert not any(n.kind is NoticeKind.LOW_BATTERY for n in desk.notices)


# --- persistence -------------------------------------------------------------


def test_every_change_is_persisted_and_recorded_for_the_district(desk: Desk, keys: Keys) -> None:
    case_id = open_case(desk, keys)
    for actions in (
        fire(desk, case_id),
        desk.handle(PersonAnswered("gl1", case_id, "accept", "", T + 130), T + 130),
        desk.handle(PersonAnswered("gl1", case_id, "resolved", "", T + 900), T + 900),
    ):
        [case] = persisted(actions)
        [record] = [a for a in actions if isinstance(a, RecordForDistrict) and a.kind == "case"]
        assert record.payload["state"] == case.state.value
        assert len(record.payload["transitions"]) == len(case.transitions)
        # What must be written comes before anything sent out.
        kinds = [type(a) for a in actions]
        assert kinds.index(PersistCase) < min(
            (kinds.index(k) for k in (Notify, SetCallerFeedback) if k in kinds), default=99
        )


def test_restore_mid_escalation_continues_at_the_same_step_with_the_remaining_time(
    keys: Keys,
) -> None:
    village = make_village()
    running = Desk(village)
    case_id = open_case(running, keys)
    fire(running, case_id)  # step 2: gl1, until T + 240

    # kill -9 at T + 150; the runtime rebuilds from stored plain data.
    stored = json.loads(json.dumps(running.snapshot().to_dict()))
    reborn = Desk(village)
    rearm = reborn.restore(*_parts(DeskSnapshot.from_dict(stored)))
    assert rearm == [ScheduleDeadline(case_id, DeadlineKind.ACK, T + 240)]
    assert reborn.snapshot() == running.snapshot()

    case = reborn.cases[case_id]
    assert (case.current, case.step, case.round) == ("gl1", 1, 0)
    # The timer fires at the original time and both desks decide the same.
    after_restart = fire(reborn, case_id)
    uninterrupted = fire(running, case_id)
    assert after_restart == uninterrupted
    assert reborn.cases[case_id].current == "sec"
    assert reborn.cases[case_id].round == 1


def test_restore_keeps_the_latest_resolved_case_for_ratings(keys: Keys) -> None:
    village = make_village()
    running = Desk(village)
    resolve(running, keys)
    reborn = Desk(village)
    assert reborn.restore(*_parts(running.snapshot())) == []
    actions = reborn.handle(keys.press(1001, Key.UP, T + 1000), T + 1000)
    assert persisted(actions)[0].id == "1001-1"


def _parts(
    snap: DeskSnapshot,
) -> tuple[tuple[Case, ...], tuple[Notice, ...], Mapping[int, float]]:
    return (snap.cases, snap.notices, snap.last_seen)


# --- figures -----------------------------------------------------------------


def test_figures_count_the_closed_loop(desk: Desk, keys: Keys) -> None:
    from gateway.desk import case_from_dict, case_to_dict, figures

    store: dict[str, Case] = {}

    def run(event: DeskEvent, now: float) -> None:
        for action in desk.handle(event, now):
            if isinstance(action, PersistCase):
                store[action.case.id] = action.case

    # 1001: accepted after 30 s, resolved after 600 s, thumbs up.
    run(keys.press(1001, Key.CALL, T), T)
    run(PersonAnswered("sec", "1001-1", "accept", "", 0), T + 30)
    run(PersonAnswered("sec", "1001-1", "resolved", "", 0), T + 600)
    run(keys.press(1001, Key.UP, T + 700), T + 700)
    # 1002: accepted by the grid leader after 150 s, resolved after 1200 s, thumbs down.
    run(keys.press(1002, Key.CALL, T), T)
    run(DeadlineDue("1002-1", "ack", T + 120), T + 120)
    run(PersonAnswered("gl1", "1002-1", "accept", "", 0), T + 150)
    run(PersonAnswered("gl1", "1002-1", "resolved", "", 0), T + 1200)
    run(keys.press(1002, Key.DOWN, T + 1300), T + 1300)
    # 1003: cancelled by mistake.
    run(keys.press(1003, Key.CALL, T), T)
    run(keys.press(1003, Key.HANGUP, T + 3), T + 3)

    result = figures(case_from_dict(case_to_dict(c)) for c in store.values())
    total = result.total
    assert (total.opened, total.resolved, total.cancelled, total.still_open) == (3, 2, 1, 0)
    assert total.accept_median_s == 90
    assert total.accept_p90_s == 150
    assert total.resolve_median_s == 900
    assert (total.rated, total.satisfied, total.satisfaction) == (2, 1, 0.5)
    assert result.per_person["gl1"].satisfaction == 0
    assert result.per_person["sec"].resolve_p90_s == 600
    assert result.per_grid["grid-1"].opened == 3
    assert result.to_dict()["total"]["satisfaction"] == 0.5


def test_the_opening_press_fed_twice_does_not_escalate(desk: Desk, keys: Keys) -> None:
    press = keys.press(1001, Key.CALL, T)
    desk.handle(press, T)
    again = desk.handle(press, T + 60)
    assert [type(a) for a in again] == [Rejected]
    assert not desk.cases["1001-1"].urgent
