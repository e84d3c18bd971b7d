"""Random presses, answers, timers, channel failures and restarts against the desk.

The machine plays the runtime: it keeps the timers the desk asked for, a store
of the last persisted version of each case, and now and then "kills -9" the
desk and rebuilds it from JSON.  Time only moves forward, and never past a
pending timer without firing it, as a real event loop would.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from firmware_protocol import Key
from gateway.desk import (
    Action,
    CancelDeadline,
    Case,
    Desk,
    DeskSnapshot,
    PersistCase,
    RecordForDistrict,
    ScheduleDeadline,
)
from gateway.events import DeadlineDue, DeskEvent, KeyPressed, NotifyFailed, PersonAnswered, Tick
from tests.unit.test_desk import T, make_village

DEVICES = (1001, 1002, 1003)
PEOPLE = ("sec", "dep", "gl1", "gw1", "town", "stranger")
ANSWERS = ("accept", "decline", "arrived", "resolved")


class DeskMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.village = make_village()
        self.desk = Desk(self.village)
        self.now = T
        self.counters = dict.fromkeys(DEVICES, 0)
        self.timers: dict[str, ScheduleDeadline] = {}  # what the runtime has armed
        self.store: dict[str, Case] = {}  # last persisted version of each case
        self.general: set[tuple[int, int]] = set()  # ratings kept as general feedback
        self.restarts = 0

    # --- the runtime's side ---------------------------------------------------

    def deliver(self, event: DeskEvent) -> list[Action]:
        actions = self.desk.handle(event, self.now)
        for action in actions:
            if isinstance(action, PersistCase):
                self.store[action.case.id] = action.case
            elif isinstance(action, ScheduleDeadline):
                self.timers[action.case_id] = action
            elif isinstance(action, CancelDeadline):
                self.timers.pop(action.case_id, None)
            elif isinstance(action, RecordForDistrict) and action.kind == "general_feedback":
                key = (action.payload["device_id"], action.payload["counter"])
                assert key not in self.general
                self.general.add(key)
        return actions

    def earliest_due(self) -> float | None:
        return min((t.due_at for t in self.timers.values()), default=None)

    # --- rules ----------------------------------------------------------------

    @rule(device=st.sampled_from(DEVICES), key=st.sampled_from(list(Key)))
    def press(self, device: int, key: Key) -> None:
        self.counters[device] += 1
        self.deliver(KeyPressed(device, self.counters[device], "serial:bus1", self.now, True, key))

    @rule(data=st.data(), person=st.sampled_from(PEOPLE), answer=st.sampled_from(ANSWERS))
    def answer(self, data: st.DataObject, person: str, answer: str) -> None:
        ids = sorted(self.store) or ["1001-1"]
        case_id = data.draw(st.sampled_from(ids), label="case")
        self.deliver(PersonAnswered(person, case_id, answer, "", self.now))

    @rule(seconds=st.floats(0, 2000))
    def wait(self, seconds: float) -> None:
        due = self.earliest_due()
        target = self.now + seconds
        self.now = target if due is None else min(target, max(self.now, due))

    @precondition(lambda self: bool(self.timers))
    @rule()
    def timer_fires(self) -> None:
        timer = min(self.timers.values(), key=lambda t: (t.due_at, t.case_id))
        self.now = max(self.now, timer.due_at)
        self.deliver(DeadlineDue(timer.case_id, timer.kind.value, timer.due_at))
        # Once delivered, the case has moved on: a new deadline or none.
        case = self.desk.cases.get(timer.case_id)
        if case is not None and case.deadline is not None:
            assert (case.deadline.kind, case.deadline.due_at) != (timer.kind, timer.due_at)

    @rule(data=st.data(), channel=st.sampled_from(["app", "sms", "voice"]))
    def channel_fails(self, data: st.DataObject, channel: str) -> None:
        waiting = sorted(c.id for c in self.desk.cases.values() if c.current is not None)
        if not waiting:
            return
        case = self.desk.cases[data.draw(st.sampled_from(waiting), label="case")]
        assert case.current is not None
        self.deliver(NotifyFailed(case.current, case.id, channel))

    @rule()
    def tick(self) -> None:
        self.deliver(Tick())

    @rule()
    def kill_and_restart(self) -> None:
        stored = json.loads(json.dumps(self.desk.snapshot().to_dict()))
        snap = DeskSnapshot.from_dict(stored)
        before = self.desk.snapshot()
        self.desk = Desk(self.village)
        rearm = self.desk.restore(snap.cases, snap.notices, snap.last_seen)
        assert self.desk.snapshot() == before
        # The timers rebuilt from data are exactly those the runtime had armed.
        assert {t.case_id: t for t in rearm} == self.timers
        self.timers = {t.case_id: t for t in rearm}
        self.restarts += 1

    # --- invariants -----------------------------------------------------------

    @invariant()
    def open_unaccepted_cases_have_exactly_one_timer(self) -> None:
        for case in self.desk.cases.values():
            if case.waiting:
                assert case.deadline is not None, case
            if case.deadline is None:
                assert case.id not in self.timers
            else:
                timer = self.timers[case.id]
                assert (timer.kind, timer.due_at) == (case.deadline.kind, case.deadline.due_at)
        assert set(self.timers) <= set(self.desk.cases)

    @invariant()
    def nothing_waits_past_its_timeout(self) -> None:
        due = self.earliest_due()
        assert due is None or due >= self.now
        for case in self.desk.cases.values():
            if case.current is not None and case.deadline is not None:
                # Waiting for a person never longer than the longest step timeout.
                last = case.transitions[-1].at
                assert case.deadline.due_at - last <= 180 + 1e-6

    @invariant()
    def no_case_is_lost(self) -> None:
        for case_id, stored in self.store.items():
            if stored.open:
                assert self.desk.cases.get(case_id) == stored
        for case_id, case in self.desk.cases.items():
            assert self.store[case_id] == case
        open_per_device = [c.device_id for c in self.desk.cases.values() if c.open]
        assert len(open_per_device) == len(set(open_per_device))

    @invariant()
    def each_rating_lands_on_at_most_one_case(self) -> None:
        attached = [(r.device_id, r.counter) for c in self.store.values() for r in c.ratings]
        assert len(attached) == len(set(attached))
        assert not set(attached) & self.general
        for case in self.store.values():
            assert all(r.case_id == case.id for r in case.ratings)
            assert case.rating is None or case.rating == case.ratings[-1]


DeskMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDesk = DeskMachine.TestCase
