"""Intake: from decoded frames to durable, de-duplicated events and acknowledgements.

Order matters and is the whole point of this module:

    authenticate -> drop replays -> de-duplicate -> journal (commit) -> acknowledge

A caller is told "received" only after its press is on disk.  Frames that
arrive while a commit is in flight are committed together in the next one
(group commit), so a burst of presses costs a few fsyncs, not one each.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from firmware_protocol import (
    Ack,
    CallerAck,
    Feedback,
    Frame,
    Heartbeat,
    KeyPress,
    Reason,
    Rejected,
    ReplayGuard,
    Verdict,
    encode,
    verify_mac,
)

from .clock import WallClock
from .events import CallerEvent, DeskEvent, HeartbeatReceived, KeyPressed
from .log import get_logger
from .metrics import Metrics
from .store import Store, StoreError

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = ["Intake", "KeyRing", "Link"]

log = get_logger("gateway.intake")

_DOWNLINK_BLOCK = 1024
# A press whose first copy was lost may be repeated after later frames from
# the same caller got through; accept it if it is at most this far behind.
LATE_WINDOW = 64
REPLAY_WINDOW = 4
_FEEDBACK_TRIES = 4
_FEEDBACK_ACK_TIMEOUT_S = 1.0
_STORE_RETRY_S = 1.0


class Link(Protocol):
    """What the intake needs of a device link: a name and a way to reach a caller."""

    name: str

    def send(self, device_id: int, frame: bytes) -> bool:
        """Queue a downlink frame; False when the link cannot take it now."""
        ...


KeyRing = Callable[[int], bytes | None]


@dataclass(slots=True)
class _Pending:
    frame: Frame
    link: Link
    event: CallerEvent
    # Copies that arrived while the commit was in flight; each gets its ack.
    repeats: list[Link] = field(default_factory=list)


class _DownlinkCounters:
    """Downlink frame counters, reserved on disk in blocks.

    A caller rejects a downlink counter it has already seen, so after a restart
    the gateway must continue above every counter it ever used.  Persisting
    each one would cost an fsync per acknowledgement; reserving a block costs
    one per 1,024 frames per caller, and a restart skips the unused rest.
    """

    def __init__(self, reserved: dict[int, int]) -> None:
        self._reserved = dict(reserved)
        self._next = {d: r + 1 for d, r in reserved.items()}

    def shortfall(self, device_id: int, n: int = 1) -> int | None:
        """The reservation to write before ``n`` more counters can be taken, if any."""
        nxt = self._next.get(device_id, 1)
        if nxt + n - 1 <= self._reserved.get(device_id, 0):
            return None
        return nxt + n - 1 + _DOWNLINK_BLOCK

    def granted(self, device_id: int, up_to: int) -> None:
        self._reserved[device_id] = max(up_to, self._reserved.get(device_id, 0))
        self._next.setdefault(device_id, 1)

    def take(self, device_id: int) -> int:
        nxt = self._next.get(device_id, 1)
        if nxt > self._reserved.get(device_id, 0):
            raise RuntimeError(f"downlink counter for caller {device_id} not reserved")
        self._next[device_id] = nxt + 1
        return nxt


class Intake:
    def __init__(
        self,
        store: Store,
        keys: KeyRing,
        *,
        metrics: Metrics,
        clock: WallClock,
        max_batch: int = 256,
        on_event: Callable[[CallerEvent], Any] | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._metrics = metrics
        self._clock = clock
        self._max_batch = max_batch
        self._on_event = on_event
        # A retransmission repeats a caller's latest frame (nothing else goes out
        # while a press waits, SPEC.md 10.2), so four recent frames per caller
        # tell a repeat from a replay; anything older is asked of the journal.
        # The default of sixteen cost 21 MB with 10,000 callers, a third of
        # the gateway's memory.
        self._guard = ReplayGuard(window=REPLAY_WINDOW, late_window=LATE_WINDOW)
        self._queue: asyncio.Queue[_Pending | DeskEvent] = asyncio.Queue()
        self._dispatcher: Dispatcher | None = None
        self.links: list[Link] = []  # every link, for callers whose route is unknown
        # Held while a batch is decided and committed; a configuration swap
        # takes it so the desk never changes in the middle of a batch.
        self.commit_lock = asyncio.Lock()
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._counters = _DownlinkCounters({})
        self._routes: dict[int, Link] = {}
        self._feedback: dict[tuple[int, int], asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stored_events = 0

    async def load(self) -> None:
        """Restore counters from the store.  Call once before frames arrive."""
        for device_id, high in (await self._store.high_water_marks()).items():
            self._guard.load(device_id, high, ())
        self._counters = _DownlinkCounters(await self._store.downlink_reservations())

    # -- from the links ------------------------------------------------------------

    def submit(self, item: Frame | Rejected, link: Link) -> None:
        """Take one decoded item from a link.  Never raises: a bad frame is counted."""
        try:
            if isinstance(item, Rejected):
                self._reject(item, link)
            else:
                self._frame(item, link)
        except Exception:
            self._metrics.inc("gateway_intake_errors_total", link=link.name)
            log.exception("frame handling failed", link=link.name, rate_key=link.name)

    def _reject(self, item: Rejected, link: Link) -> None:
        self._metrics.inc("gateway_rejected_frames_total", reason=item.reason.value, link=link.name)
        fields: dict[str, Any] = {"link": link.name, "reason": item.reason.value}
        if item.device_id is not None:
            fields["device"] = item.device_id
        if item.counter is not None:
            fields["counter"] = item.counter
        log.warning(
            "frame rejected",
            detail=item.detail,
            data=item.data[:32].hex(),
            rate_key=f"{link.name}:{item.reason.value}:{item.device_id}",
            **fields,
        )

    def _frame(self, frame: Frame, link: Link) -> None:
        if not frame.type.uplink:
            # RS-485 adapters echo what the gateway sends; that is not an error.
            self._metrics.inc("gateway_ignored_frames_total", reason="echo", link=link.name)
            return
        key = self._keys(frame.device_id)
        if key is None:
            self._reject(
                Rejected(
                    Reason.UNKNOWN_DEVICE,
                    frame.raw,
                    f"caller {frame.device_id} is not in the residents file",
                    frame.device_id,
                    frame.counter,
                ),
                link,
            )
            return
        if not verify_mac(frame, key):
            self._reject(
                Rejected(
                    Reason.BAD_MAC,
                    frame.raw,
                    "message authentication code does not match the caller's key",
                    frame.device_id,
                    frame.counter,
                ),
                link,
            )
            return
        ident = (frame.device_id, frame.counter)
        pending = self._pending.get(ident)
        if pending is not None:
            if pending.frame.mac != frame.mac:
                self._reject(
                    Rejected(
                        Reason.REPLAY,
                        frame.raw,
                        "counter reused with other content",
                        frame.device_id,
                        frame.counter,
                    ),
                    link,
                )
                return
            # A retransmission of a frame whose commit is in flight: it is
            # acknowledged with the original, once the commit is done.
            self._metrics.inc("gateway_duplicate_frames_total", link=link.name)
            pending.repeats.append(link)
            return
        verdict = self._guard.check(frame.device_id, frame.counter, frame.mac)
        if verdict is Verdict.DUPLICATE:
            self._metrics.inc("gateway_duplicate_frames_total", link=link.name)
            self._routes[frame.device_id] = link
            self._spawn(self._reack(frame, link))
            return
        if verdict is not Verdict.NEW:
            # Below the mark and not in the recent window: the journal decides
            # whether it is a repeat of something stored long ago, a late
            # first arrival, or a replay.
            self._spawn(self._check_old(frame, link, late=verdict is Verdict.LATE))
            return
        self._accept_new(frame, link)

    def _accept_new(self, frame: Frame, link: Link) -> None:
        self._routes[frame.device_id] = link
        if isinstance(frame.message, CallerAck):
            self._guard.accept(frame.device_id, frame.counter, frame.mac)
            self._caller_ack(frame.device_id, frame.message.acked_counter)
            return
        item = _Pending(frame, link, self._to_event(frame, link))
        self._pending[(frame.device_id, frame.counter)] = item
        self._queue.put_nowait(item)

    def _to_event(self, frame: Frame, link: Link) -> CallerEvent:
        now = self._clock.now()
        trusted = self._clock.trusted()
        msg = frame.message
        if isinstance(msg, KeyPress):
            return KeyPressed(frame.device_id, frame.counter, link.name, now, trusted, msg.key)
        if isinstance(msg, Heartbeat):
            return HeartbeatReceived(
                frame.device_id,
                frame.counter,
                link.name,
                now,
                trusted,
                msg.battery_mv,
                msg.battery_pct,
                msg.signal_dbm,
                msg.external_power,
                msg.low_battery,
            )
        raise TypeError(f"no event for {type(msg).__name__}")

    async def _check_old(self, frame: Frame, link: Link, *, late: bool) -> None:
        mac = await self._store.frame_mac(frame.device_id, frame.counter)
        if mac is not None and mac == frame.mac:
            self._metrics.inc("gateway_duplicate_frames_total", link=link.name)
            self._routes[frame.device_id] = link
            await self._reack(frame, link)
            return
        if mac is None and late:
            # The journal was asked with an await; another copy may have been
            # taken meanwhile.  If so, the ordinary path now knows what it is.
            ident = (frame.device_id, frame.counter)
            verdict = self._guard.check(frame.device_id, frame.counter, frame.mac)
            if ident in self._pending or verdict is not Verdict.LATE:
                self._frame(frame, link)
                return
            self._metrics.inc("gateway_late_frames_total", link=link.name)
            self._accept_new(frame, link)
            return
        high = self._guard.high_water(frame.device_id)
        if mac is not None or frame.counter > high - LATE_WINDOW:
            detail = f"counter {frame.counter} was already used by another frame"
        else:
            detail = (
                f"counter {frame.counter} is more than {LATE_WINDOW} below {high}, "
                "the last accepted"
            )
        self._reject(
            Rejected(Reason.REPLAY, frame.raw, detail, frame.device_id, frame.counter), link
        )

    async def _reack(self, frame: Frame, link: Link) -> None:
        await self._reserve(frame.device_id)
        self._send_ack_now(frame, link)

    async def _reserve(self, device_id: int) -> None:
        need = self._counters.shortfall(device_id)
        if need is not None:
            await self._store.reserve_downlink(device_id, need)
            self._counters.granted(device_id, need)

    def _send_ack_now(self, frame: Frame, link: Link) -> None:
        if self._counters.shortfall(frame.device_id) is not None:
            # More copies than the batch reserved for: reserve, then send.
            self._spawn(self._reack(frame, link))
            return
        key = self._keys(frame.device_id)
        if key is None:  # removed from the residents file since
            return
        ack = encode(
            Ack(frame.counter),
            device_id=frame.device_id,
            counter=self._counters.take(frame.device_id),
            key=key,
        )
        if not link.send(frame.device_id, ack):
            self._metrics.inc("gateway_downlink_dropped_total", link=link.name, kind="ack")

    # -- the committer -------------------------------------------------------------

    async def run(self) -> None:
        """Commit queued items in groups, then act on them.  Runs until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self.commit_lock:
                    await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def submit_event(self, event: DeskEvent) -> None:
        """Queue an event that did not come from a caller (an answer, a timer).

        It is committed with the callers' events, in arrival order, so the desk
        sees one sequence of events and each of its decisions is on disk before
        anybody hears of it.
        """
        self._queue.put_nowait(event)

    def attach(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        dispatcher.connect(self.submit_event)

    async def _commit(self, batch: list[_Pending | DeskEvent]) -> None:
        frames = [p for p in batch if isinstance(p, _Pending)]
        wanted: dict[int, int] = {}
        per_device: dict[int, int] = {}
        for p in frames:
            # Room for the acks of copies that may still arrive before the commit ends.
            per_device[p.frame.device_id] = per_device.get(p.frame.device_id, 0) + 4
        for device_id, n in per_device.items():
            need = self._counters.shortfall(device_id, n)
            if need is not None:
                wanted[device_id] = need
        events = [p.event if isinstance(p, _Pending) else p for p in batch]
        dispatcher = self._dispatcher
        prepared = dispatcher.prepare(events, self._clock.now()) if dispatcher else None
        try:
            await self._store.append(
                [(p.event, p.frame.mac) for p in frames],
                downlink_reservations=wanted,
                desk=prepared.writes if prepared else None,
            )
        except StoreError as exc:
            if dispatcher is not None and prepared is not None:
                await dispatcher.rollback(prepared)
            for p in frames:
                self._pending.pop((p.frame.device_id, p.frame.counter), None)
            self._metrics.inc("gateway_store_errors_total")
            log.error(
                "events not stored; not acknowledging, callers will repeat",
                error=str(exc),
                frames=len(frames),
                rate_key="append",
            )
            await asyncio.sleep(_STORE_RETRY_S)
            # Callers repeat their frames; answers and timers have nobody to
            # repeat them, so they go round again.
            for item in batch:
                if not isinstance(item, _Pending):
                    self._queue.put_nowait(item)
            return
        for device_id, up_to in wanted.items():
            self._counters.granted(device_id, up_to)
        for p in frames:
            frame = p.frame
            self._pending.pop((frame.device_id, frame.counter), None)
            self._guard.accept(frame.device_id, frame.counter, frame.mac)
            for link in (p.link, *p.repeats):
                self._send_ack_now(frame, link)
            kind = "key" if isinstance(p.event, KeyPressed) else "heartbeat"
            self._metrics.inc("gateway_events_stored_total", kind=kind, link=p.link.name)
        self.stored_events += len(frames)
        if dispatcher is not None and prepared is not None:
            dispatcher.apply(prepared)
        if self._on_event is not None:
            for p in frames:
                try:
                    self._on_event(p.event)
                except Exception:
                    self._metrics.inc("gateway_intake_errors_total", link=p.link.name)
                    log.exception(
                        "event handler failed", device=p.event.device_id, rate_key="on_event"
                    )

    # -- feedback to callers -------------------------------------------------------

    async def send_feedback(self, device_id: int, feedback: Feedback) -> bool:
        """Send LED/buzzer feedback until the caller acknowledges it; True if it did.

        Each repeat carries a fresh counter (SPEC.md 9): a caller that showed the
        first copy but whose CALLER_ACK was lost would reject a byte-identical
        repeat as a replay and never answer it.
        """
        key = self._keys(device_id)
        route = self._routes.get(device_id)
        # A caller not heard from since start (the gateway restarted mid-case)
        # is looked for on every link: on a bus, callers ignore other ids.
        links = [route] if route is not None else list(self.links)
        if key is None or not links:
            self._metrics.inc("gateway_feedback_total", outcome="no_route")
            return False
        acked = asyncio.Event()
        used: list[int] = []
        try:
            for attempt in range(_FEEDBACK_TRIES):
                if attempt:
                    # The caller's own repeat rule (SPEC.md 10.2), so a busy bus recovers.
                    delay = min(8.0, 0.5 * 2 ** (attempt - 1))
                    await asyncio.sleep(delay + random.uniform(0, delay / 2))
                await self._reserve(device_id)
                counter = self._counters.take(device_id)
                used.append(counter)
                self._feedback[(device_id, counter)] = acked
                raw = encode(feedback, device_id=device_id, counter=counter, key=key)
                route = self._routes.get(device_id)
                for link in [route] if route is not None else links:
                    if not link.send(device_id, raw):
                        self._metrics.inc(
                            "gateway_downlink_dropped_total", link=link.name, kind="feedback"
                        )
                try:
                    await asyncio.wait_for(acked.wait(), _FEEDBACK_ACK_TIMEOUT_S)
                except TimeoutError:
                    continue
                self._metrics.inc("gateway_feedback_total", outcome="acked")
                return True
        finally:
            for counter in used:
                self._feedback.pop((device_id, counter), None)
        self._metrics.inc("gateway_feedback_total", outcome="unacknowledged")
        log.warning(
            "feedback not acknowledged",
            device=device_id,
            state=feedback.state.name,
            rate_key=device_id,
        )
        return False

    def _caller_ack(self, device_id: int, acked_counter: int) -> None:
        acked = self._feedback.get((device_id, acked_counter))
        if acked is not None:
            acked.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._metrics.inc("gateway_intake_errors_total", link="-")
            log.error("intake task failed", error=repr(task.exception()), rate_key="task")

    async def drain(self, grace_s: float) -> bool:
        """Wait until queued frames are committed (for shutdown); False if it took too long."""
        try:
            await asyncio.wait_for(self._queue.join(), grace_s)
        except TimeoutError:
            log.error(
                "shutdown: frames still uncommitted; callers will repeat them",
                frames=self._queue.qsize(),
            )
            return False
        return True
