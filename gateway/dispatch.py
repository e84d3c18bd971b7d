"""Carrying out the call desk's decisions.

The desk is pure; this is where its actions touch the world.  For each batch
of events the intake commits:

    prepare()  the desk decides; its writes join the batch's transaction
    apply()    after the commit: timers, messages to people, caller feedback
    rollback() if the commit failed: the desk forgets what it decided

so nothing is sent to anyone about a decision that is not on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from firmware_protocol import Feedback

from .clock import WallClock
from .desk import (
    CancelDeadline,
    Desk,
    MessageKind,
    Notify,
    PersistCase,
    PersistNotice,
    RecordForDistrict,
    Rejected,
    ScheduleDeadline,
    SetCallerFeedback,
    Village,
)
from .events import (
    CallerEvent,
    DeadlineDue,
    DeskEvent,
    NotifyFailed,
    PersonAnswered,
    Tick,
)
from .log import get_logger
from .metrics import Metrics
from .notify import Channel, ChannelError, Delivery, Outgoing
from .store import DeskWrites, Store, StoreError

__all__ = ["TICK_S", "Dispatcher", "Prepared"]

log = get_logger("gateway.dispatch")

TICK_S = 60.0  # supervision: silent callers, overdue deadlines
SEND_TIMEOUT_S = 30.0  # a channel that takes longer to take a message has failed
# A call that has not ended this long after dialling is lost (the follower is
# stuck); ring time and answer window together are a few minutes at most.
DELIVERY_TIMEOUT_S = 600.0
_CALL_KINDS = frozenset({MessageKind.CALL, MessageKind.URGENT_CALL})


_ACCEPT_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class Prepared:
    writes: DeskWrites
    after: list[Any] = field(default_factory=list)


def _event_record(event: DeskEvent) -> tuple[str, str | None, dict[str, Any]] | None:
    """How a non-caller event is journalled (callers' events have their own table)."""
    if isinstance(event, CallerEvent | Tick):
        return None
    kind = {PersonAnswered: "answer", DeadlineDue: "deadline", NotifyFailed: "notify_failed"}[
        type(event)
    ]
    return kind, getattr(event, "case_id", None), dataclasses.asdict(event)


class Dispatcher:
    def __init__(
        self,
        desk: Desk,
        village: Village,
        *,
        store: Store,
        channels: Mapping[str, Channel],
        send_feedback: Callable[[int, Feedback], Awaitable[bool]],
        metrics: Metrics,
        clock: WallClock,
    ) -> None:
        self.desk = desk
        self.village = village
        self._store = store
        self._channels = dict(channels)
        self._send_feedback = send_feedback
        self._metrics = metrics
        self._clock = clock
        self._submit: Callable[[DeskEvent], None] = lambda _e: None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def connect(self, submit: Callable[[DeskEvent], None]) -> None:
        """Where timers, answers and channel failures are sent: the intake's queue."""
        self._submit = submit

    # -- with the intake's commit -----------------------------------------------------

    def prepare(self, events: Sequence[DeskEvent], now: float) -> Prepared:
        # No copy of the desk is taken for a rollback: that would cost a copy of
        # every caller's state per batch, on the path of every press.  A failed
        # commit reloads the desk from the store instead (rare, and correct).
        prepared = Prepared(DeskWrites(at=now, wall_trusted=self._clock.trusted()))
        cases: dict[str, Any] = {}
        w = prepared.writes
        for event in events:
            record = _event_record(event)
            if record is not None:
                w.desk_events.append(record)
            try:
                actions = self.desk.handle(event, now)
            except Exception:
                # One event the desk cannot digest must not stop every other caller.
                self._metrics.inc("gateway_desk_errors_total")
                log.exception("the desk failed on an event", event=repr(event), rate_key="desk")
                continue
            for action in actions:
                if isinstance(action, PersistCase):
                    cases[action.case.id] = action.case
                elif isinstance(action, PersistNotice):
                    w.notices.append((action.notice, action.cleared))
                elif isinstance(action, RecordForDistrict):
                    payload = action.payload
                    case_id = payload.get("id") if action.kind == "case" else payload.get("case_id")
                    w.outbox.append((action.kind, case_id, payload))
                else:
                    prepared.after.append(action)
        w.cases = list(cases.values())
        return prepared

    async def rollback(self, prepared: Prepared) -> None:
        """The batch did not commit: the desk goes back to what the store holds."""
        settings = self.village.settings
        try:
            state = await self._store.load_desk_state(
                now=self._clock.now(), rating_window_s=settings.rating_window_s
            )
        except StoreError as exc:
            self._metrics.inc("gateway_desk_errors_total")
            log.critical("desk not rolled back: the store cannot be read", error=str(exc))
            return
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.rearm(self.desk.restore(state.cases, state.notices, state.last_seen))

    def apply(self, prepared: Prepared) -> None:
        for case in prepared.writes.cases:
            if case.accepted_at is not None and case.accepted_at == prepared.writes.at:
                self._metrics.observe(
                    "gateway_time_to_accept_seconds",
                    case.accepted_at - case.opened_at,
                    _ACCEPT_BUCKETS,
                )
            log.info(
                "case",
                case=case.id,
                state=case.state.value,
                device=case.device_id,
                step=case.step,
                round=case.round,
                current=case.current,
                urgent=case.urgent,
            )
        for action in prepared.after:
            if isinstance(action, ScheduleDeadline):
                self._arm(action)
            elif isinstance(action, CancelDeadline):
                handle = self._timers.pop(action.case_id, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(action, Notify):
                self._spawn(self._notify(action))
            elif isinstance(action, SetCallerFeedback):
                self._spawn(self._feedback(action))
            elif isinstance(action, Rejected):
                self._metrics.inc("gateway_desk_rejected_total", reason=action.reason)
                log.warning(
                    "desk ignored an event",
                    event_kind=action.event,
                    reason=action.reason,
                    rate_key=action.reason,
                )

    # -- timers ---------------------------------------------------------------------

    def replace(self, desk: Desk, village: Village) -> None:
        """Carry on with a desk built from a new configuration (same cases)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.desk, self.village = desk, village
        self.rearm(desk.pending_deadlines())

    def rearm(self, deadlines: Sequence[ScheduleDeadline]) -> None:
        for deadline in deadlines:
            self._arm(deadline)

    def _arm(self, action: ScheduleDeadline) -> None:
        old = self._timers.pop(action.case_id, None)
        if old is not None:
            old.cancel()
        # The timer runs on the monotonic clock: a wall-clock jump after this
        # (NTP fixing a Pi's time) does not move it.
        delay = max(0.0, action.due_at - self._clock.now())
        loop = asyncio.get_running_loop()
        self._timers[action.case_id] = loop.call_later(
            delay, self._due, action.case_id, action.kind.value, action.due_at
        )

    def _due(self, case_id: str, kind: str, due_at: float) -> None:
        self._timers.pop(case_id, None)
        self._submit(DeadlineDue(case_id, kind, due_at))

    async def tick(self, period_s: float = TICK_S) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._submit(Tick())

    def stop(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()

    # -- reaching people and callers ---------------------------------------------------

    async def _notify(self, action: Notify) -> None:
        person = self.village.people.get(action.person_id)
        if person is None:
            log.error("notify: unknown person", person=action.person_id)
            return
        message = Outgoing(
            person_id=person.id,
            person_name=person.name,
            phone=person.phone,
            app_id=person.app_id,
            case_id=action.case_id,
            kind=action.kind.value,
            text=action.text,
        )
        await self._try_channels(action, message, [c.value for c in action.channels])

    async def _try_channels(self, action: Notify, message: Outgoing, names: list[str]) -> None:
        """Try ``names`` in order; stop at the first that takes the message."""
        person = self.village.people.get(action.person_id)
        person_channels = {c.value for c in person.channels} if person is not None else set()
        for i, channel_name in enumerate(names):
            channel = self._channels.get(channel_name)
            outcome, detail = "sent", ""
            later: Awaitable[Delivery] | None = None
            if channel is None:
                outcome, detail = "failed", f"this gateway has no {channel_name} channel"
            else:
                try:
                    later = await asyncio.wait_for(channel.send(message), SEND_TIMEOUT_S)
                except ChannelError as exc:
                    outcome, detail = "failed", str(exc)
                except TimeoutError:
                    outcome, detail = "failed", f"not taken within {SEND_TIMEOUT_S:.0f} s"
                except Exception as exc:  # a channel bug is a failed channel, not a dead task
                    outcome, detail = "failed", f"channel error: {exc!r}"
                    log.exception("channel failed", channel=channel_name, rate_key=channel_name)
            self._metrics.inc("gateway_notifications_total", channel=channel_name, outcome=outcome)
            await self._record(action, channel_name, outcome, detail)
            if outcome == "sent":
                log.info(
                    "person notified",
                    person=message.person_id,
                    channel=channel_name,
                    case=action.case_id,
                    kind=action.kind.value,
                )
                along: tuple[str, ...] = ()
                if (
                    channel_name == "voice"
                    and "sms" in person_channels
                    and await self._also_sms(action, message)
                ):
                    # A ringing phone says "come" but not where to or how to
                    # answer; the text does, and stays on the phone.
                    along = ("sms",)
                if later is not None:
                    rest = [n for n in names[i + 1 :] if n not in along]
                    self._spawn(self._follow(action, message, channel_name, later, along, rest))
                return
            log.warning(
                "channel failed; trying the next",
                person=message.person_id,
                channel=channel_name,
                case=action.case_id,
                detail=detail,
                rate_key=f"{message.person_id}:{channel_name}",
            )
            self._submit(NotifyFailed(message.person_id, action.case_id, channel_name))

    async def _follow(
        self,
        action: Notify,
        message: Outgoing,
        channel_name: str,
        later: Awaitable[Delivery],
        along: tuple[str, ...],
        rest: list[str],
    ) -> None:
        """A message taken by a channel that learns later whether the person
        was reached (a call): record how it ended on the case, and when nobody
        picked up, treat it as that channel failing: the desk hears at once
        and the person's next channels are tried."""
        try:
            delivery = await asyncio.wait_for(later, DELIVERY_TIMEOUT_S)
        except TimeoutError:
            delivery = Delivery("failed", False, detail=f"no outcome in {DELIVERY_TIMEOUT_S:.0f} s")
        except Exception as exc:  # a channel bug: the person was not reached
            delivery = Delivery("failed", False, detail=f"channel error: {exc!r}")
        await self._record(action, channel_name, delivery.outcome, delivery.detail)
        if delivery.reached:
            return
        if not self._still_waiting(action):
            log.info(
                "call not answered; the case no longer waits for it",
                person=message.person_id,
                case=action.case_id,
                outcome=delivery.outcome,
            )
            return
        log.warning(
            "call not answered; trying the next",
            person=message.person_id,
            case=action.case_id,
            outcome=delivery.outcome,
            detail=delivery.detail,
            rate_key=f"{message.person_id}:{channel_name}:outcome",
        )
        # Through the intake like every desk event: committed with its
        # consequences, so a restart finds the case as the desk left it.
        self._submit(
            NotifyFailed(message.person_id, action.case_id, channel_name, delivery.outcome, along)
        )
        if rest:
            await self._try_channels(action, message, rest)

    def _still_waiting(self, action: Notify) -> bool:
        """Whether a message about this case is still worth a next channel."""
        if action.case_id is None:
            return True
        case = self.desk.cases.get(action.case_id)
        if case is None or not case.open:
            return False
        return case.waiting or action.kind not in _CALL_KINDS

    async def _also_sms(self, action: Notify, message: Outgoing) -> bool:
        channel = self._channels.get("sms")
        if channel is None:
            return False
        outcome, detail = "sent", "with the call"
        try:
            await asyncio.wait_for(channel.send(message), SEND_TIMEOUT_S)
        except (ChannelError, TimeoutError) as exc:
            outcome, detail = "failed", str(exc) or "timed out"
        self._metrics.inc("gateway_notifications_total", channel="sms", outcome=outcome)
        await self._record(action, "sms", outcome, detail)
        return outcome == "sent"

    async def _record(self, action: Notify, channel: str, outcome: str, detail: str) -> None:
        try:
            await self._store.record_notification(
                at=self._clock.now(),
                case_id=action.case_id,
                person_id=action.person_id,
                kind=action.kind.value,
                channel=channel,
                outcome=outcome,
                detail=detail,
            )
        except StoreError as exc:
            log.error("notification not recorded", error=str(exc), rate_key="record")

    async def _feedback(self, action: SetCallerFeedback) -> None:
        delivered = await self._send_feedback(action.device_id, action.feedback)
        if not delivered:
            log.warning(
                "caller did not confirm its feedback",
                device=action.device_id,
                state=action.feedback.state.name,
                rate_key=action.device_id,
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._metrics.inc("gateway_desk_errors_total")
            log.error("dispatch task failed", error=repr(task.exception()), rate_key="task")
