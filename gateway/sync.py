"""Outbox → the district's case store over MQTT 5, and configuration pushes back.

The contract is ``docs/sync.md``; the payload models are in ``sync_contract``.

One batch is in flight at a time.  That is what keeps every case's records
in order even when the central side is several workers sharing one
subscription: batch n + 1 is published only after the central store said it
committed batch n.  A record leaves the outbox (``acked_at`` is set) only on
that application-level acknowledgement, never on the broker's PUBACK, which
only proves the broker has it.

Nothing here drops a record to make room: the backlog lives in SQLite and is
bounded by the disk alone; it is reported as a size and an age instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from .config import SyncConfig
from .links._backoff import Backoff
from .log import get_logger
from .metrics import Metrics
from .store import OutboxRow, OutboxStats, Store, StoreError
from .sync_contract import Ack, ConfigPush, ConfigReport, SyncTopics

__all__ = ["ApplyConfig", "Syncer"]

log = get_logger("gateway.sync")

ApplyConfig = Callable[[int, dict[str, str]], Awaitable[list[str]]]
"""``apply_config(version, files)``: the problems found, or ``[]`` when applied."""

_STATS_EVERY_S = 2.0  # a COUNT over the pending index; cheap, but not free
_PRUNE_EVERY_S = 3600.0
_PRUNE_CHUNK = 10_000
# The district should hear from a village at least this often; older records
# waiting in the outbox mean the link (or the central store) needs a person.
_STALE_WARN_S = 3600.0

_KEY_CONFIG_VERSION = "config_version"
_KEY_LAST_PUSH = "config_last_push"
_KEY_PENDING_REPORTS = "config_reports_pending"


@dataclass
class _InFlight:
    batch_id: str
    pending: set[int]  # record ids not yet acknowledged
    count: int
    since: float  # monotonic time of the first send
    attempts: int = 0


@dataclass
class _Counters:
    batches_sent: int = 0
    resends: int = 0
    records_acked: int = 0
    pruned: int = 0
    last_ack_at: float | None = None
    last_error: str | None = None
    pushes: dict[str, int] = field(default_factory=lambda: {"applied": 0, "rejected": 0})


class Syncer:
    name = "sync"

    def __init__(
        self,
        config: SyncConfig,
        *,
        village_id: str,
        store: Store,
        apply_config: ApplyConfig,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.village_id = village_id
        self.store = store
        self.apply_config = apply_config
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.topics = SyncTopics(config.prefix(village_id))
        self.client_id = config.client(village_id)
        self.connected = asyncio.Event()
        self._acks: asyncio.Queue[Ack] = asyncio.Queue()
        self._pushes: asyncio.Queue[ConfigPush | ConfigReport] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._reports_waiting = asyncio.Event()
        self._in_flight: _InFlight | None = None
        self._store_id = ""
        self._stats = OutboxStats(0, None, None, 0)
        self._stats_at = -1e9  # monotonic time of the last exact count
        self._config_version: int | None = None
        self.counters = _Counters()

    # --- what the rest of the gateway sees -----------------------------------

    @property
    def up(self) -> bool:
        return self.connected.is_set()

    def nudge(self) -> None:
        """New records are in the outbox: look now rather than at the next poll."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        s, c, f = self._stats, self.counters, self._in_flight
        return {
            "connected": self.up,
            "broker": f"{self.config.host}:{self.config.port}",
            "topic_prefix": self.topics.prefix,
            "backlog": s.backlog,
            "oldest_id": s.oldest_id,
            "oldest_age_s": self._oldest_age(),
            "acked_kept": s.acked,
            "in_flight": None
            if f is None
            else {
                "batch": f.batch_id,
                "records": f.count,
                "unacked": len(f.pending),
                "attempts": f.attempts,
                "age_s": round(time.monotonic() - f.since, 3),
            },
            "batches_sent": c.batches_sent,
            "resends": c.resends,
            "records_acked": c.records_acked,
            "last_ack_at": c.last_ack_at,
            "pruned": c.pruned,
            "config_version": self._config_version,
            "config_pushes": dict(c.pushes),
            "last_error": c.last_error,
        }

    def _oldest_age(self) -> float | None:
        at = self._stats.oldest_created_at
        return None if at is None else round(max(0.0, self.clock() - at), 3)

    # --- the main loop --------------------------------------------------------

    async def run(self) -> None:
        self._store_id = await self.store.store_id()
        version = await self.store.sync_state(_KEY_CONFIG_VERSION)
        self._config_version = int(version) if version is not None else None
        await self._refresh_stats(count_acked=True)
        # Housekeeping and configuration pushes do not depend on the link: a
        # push being applied must not be cancelled half-way because the
        # connection dropped.
        helpers = [
            asyncio.create_task(self._housekeeping(), name="sync-housekeeping"),
            asyncio.create_task(self._config_worker(), name="sync-config"),
        ]
        try:
            await self._connection_loop()
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.connected.clear()
            self.metrics.set("gateway_sync_up", 0)

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        connect = Properties(PacketTypes.CONNECT)
        # A persistent session: acknowledgements and configuration pushes
        # published while the mobile link is down wait at the broker.
        connect.SessionExpiryInterval = cfg.session_expiry_s
        tls: ssl.SSLContext | None = None
        if cfg.tls:
            tls = ssl.create_default_context(
                cafile=str(cfg.ca_file) if cfg.ca_file is not None else None
            )
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=self.client_id,
            username=cfg.username,
            password=cfg.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=connect,
            keepalive=cfg.keepalive_s,
            tls_context=tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            timeout=max(10.0, cfg.ack_timeout_s),
        )

    async def _connection_loop(self) -> None:
        backoff = Backoff(self.config.retry_min_s, self.config.retry_max_s)
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topics.ack, qos=1)
                    await client.subscribe(self.topics.config_push, qos=1)
                    self.connected.set()
                    backoff.reset()
                    self.metrics.set("gateway_sync_up", 1)
                    log.info(
                        "connected to the district broker",
                        host=self.config.host,
                        port=self.config.port,
                        client_id=self.client_id,
                        backlog=self._stats.backlog,
                    )
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._sender(client))
                        tg.create_task(self._reporter(client))
                        async for message in client.messages:
                            self._received(message)
                    raise aiomqtt.MqttError("message stream ended")
            except* aiomqtt.MqttError as group:
                exc: BaseException = group.exceptions[0]
            except* Exception as group:  # a bug or a full disk must not end the sync for good
                exc = group.exceptions[0]
                self.metrics.inc("gateway_sync_errors_total")
                log.error("district sync failed unexpectedly", error=repr(exc), rate_key="crash")
            self.connected.clear()
            self.metrics.set("gateway_sync_up", 0)
            self.counters.last_error = str(exc)
            delay = backoff.next()
            log.warning(
                "district broker unreachable; reconnecting",
                host=self.config.host,
                port=self.config.port,
                error=str(exc),
                retry_in_s=round(delay, 2),
                backlog=self._stats.backlog,
                rate_key="reconnect",
            )
            await asyncio.sleep(delay)

    # --- uplink: the outbox ---------------------------------------------------

    async def _sender(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        while True:
            await self._take_acks()
            if time.monotonic() - self._stats_at >= _STATS_EVERY_S:
                await self._refresh_stats()
            rows = await self.store.outbox_batch(0, cfg.batch_size)
            self._note_head(rows)
            if not rows:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.poll_interval_s)
                continue
            batch_id, payload, ids = self._encode(rows)
            flight = _InFlight(batch_id, set(ids), len(ids), time.monotonic())
            self._in_flight = flight
            backoff = Backoff(cfg.retry_min_s, cfg.retry_max_s)
            try:
                while flight.pending:
                    await client.publish(
                        self.topics.batch, payload, qos=1, properties=self._batch_props(batch_id)
                    )
                    flight.attempts += 1
                    self.counters.batches_sent += 1
                    self.metrics.inc("gateway_sync_batches_sent_total")
                    wait = cfg.ack_timeout_s
                    if flight.attempts > 1:
                        wait += backoff.next()
                    deadline = loop.time() + wait
                    while flight.pending and (remaining := deadline - loop.time()) > 0:
                        try:
                            ack = await asyncio.wait_for(self._acks.get(), remaining)
                        except TimeoutError:
                            break
                        await self._apply_ack(ack)
                    if flight.pending:
                        self.counters.resends += 1
                        self.metrics.inc("gateway_sync_resends_total")
                        log.warning(
                            "no acknowledgement from the district; sending the batch again",
                            batch=batch_id,
                            records=flight.count,
                            attempts=flight.attempts,
                            rate_key="resend",
                        )
            finally:
                self._in_flight = None

    def _batch_props(self, batch_id: str) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topics.ack
        props.CorrelationData = batch_id.encode()
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        # A batch no one took in time is sent again anyway; the broker need not
        # hoard stale copies for a central store that is down for a day.
        props.MessageExpiryInterval = int(max(60.0, 4 * self.config.ack_timeout_s))
        return props

    def _encode(self, rows: list[OutboxRow]) -> tuple[str, bytes, list[int]]:
        """The batch as JSON text, cut at ``batch_max_bytes`` (never below one record).

        Payloads are already JSON in the outbox; they are spliced in rather
        than parsed and dumped again, which is most of the cost of a batch.
        """
        dumps = json.dumps
        parts: list[str] = []
        size = 0
        for row in rows:
            part = (
                f'{{"id":{row.id},"kind":{dumps(row.kind)},"case_id":{dumps(row.case_id)},'
                f'"created_at":{dumps(row.created_at)},'
                f'"wall_trusted":{"true" if row.wall_trusted else "false"},'
                f'"payload":{row.payload}}}'
            )
            size += len(part.encode()) + 1
            if parts and size > self.config.batch_max_bytes - 256:
                break
            parts.append(part)
        used = rows[: len(parts)]
        batch_id = f"{used[0].id}-{used[-1].id}"
        head = (
            f'{{"v":1,"village":{dumps(self.village_id)},"store":"{self._store_id}",'
            f'"batch":"{batch_id}","sent_at":{dumps(self.clock())},"records":['
        )
        return batch_id, (head + ",".join(parts) + "]}").encode(), [r.id for r in used]

    async def _take_acks(self) -> None:
        while not self._acks.empty():
            await self._apply_ack(self._acks.get_nowait())

    async def _apply_ack(self, ack: Ack) -> None:
        if ack.store != self._store_id:
            # Meant for this village's previous database (a replaced SD card):
            # those ids mean other records here.
            log.warning(
                "acknowledgement for another gateway database ignored",
                batch=ack.batch,
                store=ack.store,
                rate_key="foreign-ack",
            )
            return
        # Any acknowledgement counts, not only the one for the batch in flight:
        # the central store committed those records, whichever send it saw.
        now = self.clock()
        newly = await self.store.outbox_ack(ack.ids, now)
        flight = self._in_flight
        if flight is not None:
            flight.pending.difference_update(ack.ids)
        if newly:
            c = self.counters
            c.records_acked += newly
            c.last_ack_at = now
            self.metrics.inc("gateway_sync_records_acked_total", newly)
            s = self._stats
            self._stats = OutboxStats(
                max(0, s.backlog - newly), s.oldest_id, s.oldest_created_at, s.acked + newly
            )
            self._publish_gauges()

    def _note_head(self, rows: list[OutboxRow]) -> None:
        """The first unacknowledged row is the oldest: keep the age figure fresh for free."""
        s = self._stats
        if rows:
            head = rows[0]
            self._stats = OutboxStats(max(s.backlog, len(rows)), head.id, head.created_at, s.acked)
        else:
            if s.backlog:
                log.info("district sync caught up", acked=self.counters.records_acked)
            self._stats = OutboxStats(0, None, None, s.acked)
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        self.metrics.set("gateway_sync_backlog", self._stats.backlog)
        age = self._oldest_age()
        self.metrics.set("gateway_sync_oldest_age_seconds", age or 0.0)

    # --- downlink: messages from the district ---------------------------------

    def _received(self, message: Any) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            if topic == self.topics.ack:
                ack = Ack.model_validate_json(payload)
                if ack.village != self.village_id:
                    raise ValueError(f"acknowledgement names village {ack.village!r}")
                self._acks.put_nowait(ack)
            elif topic == self.topics.config_push:
                self._pushes.put_nowait(self._parse_push(bytes(payload)))
        except (ValidationError, ValueError) as exc:
            self.metrics.inc("gateway_sync_bad_messages_total")
            log.warning(
                "unusable message from the district",
                topic=topic,
                error=str(exc),
                payload=bytes(payload[:200]).decode("utf-8", "replace"),
                rate_key=topic,
            )

    def _parse_push(self, payload: bytes) -> ConfigPush | ConfigReport:
        try:
            return ConfigPush.model_validate_json(payload)
        except ValidationError as exc:
            problems = [
                f"push: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            ]
            # Tell the district exactly what was wrong with its push, if the
            # push says enough to be answered.  A version of 1e999 is an
            # OverflowError in int(); one beyond 64 bits fails the report's
            # model (a ValueError): neither can be answered, and neither may
            # escape, or one bad message would drop the connection.
            try:
                raw = json.loads(payload)
                return self._report(int(raw["version"]), str(raw["push_id"]), problems)
            except (ValueError, TypeError, KeyError, OverflowError):
                raise exc from None

    def _report(self, version: int, push_id: str, problems: list[str]) -> ConfigReport:
        return ConfigReport(
            village=self.village_id,
            version=version,
            push_id=push_id,
            applied=not problems,
            problems=problems,
            applied_version=self._config_version,
            at=self.clock(),
        )

    async def _config_worker(self) -> None:
        while True:
            item = await self._pushes.get()
            try:
                report = item if isinstance(item, ConfigReport) else await self._handle_push(item)
                await self._queue_report(report)
            except StoreError as exc:
                log.error("could not record a configuration push", error=str(exc))
                continue
            outcome = "applied" if report.applied else "rejected"
            self.counters.pushes[outcome] += 1
            self.metrics.inc("gateway_sync_config_pushes_total", outcome=outcome)
            log_fn = log.info if report.applied else log.error
            log_fn(
                f"configuration push {outcome}",
                version=report.version,
                push_id=report.push_id,
                problems=report.problems,
            )

    async def _handle_push(self, push: ConfigPush) -> ConfigReport:
        if push.village != self.village_id:
            return self._report(
                push.version,
                push.push_id,
                [f"push for village {push.village!r} reached village {self.village_id!r}"],
            )
        last = await self.store.sync_state(_KEY_LAST_PUSH)
        if last is not None:
            previous = json.loads(last)
            if previous.get("push_id") == push.push_id:
                # The broker delivered it again (QoS 1 is at least once):
                # answer the same, apply nothing twice.
                return ConfigReport.model_validate(previous["report"])
        current = self._config_version or 0
        if push.version <= current:
            return self._report(
                push.version,
                push.push_id,
                [f"version {push.version} is not newer than the version in force ({current})"],
            )
        try:
            problems = list(await self.apply_config(push.version, dict(push.files)))
        except Exception as exc:  # the old configuration stays; say why
            log.exception("applying a configuration push failed")
            problems = [f"the gateway could not apply the push: {exc!r}"]
        if not problems:
            self._config_version = push.version
        report = self._report(push.version, push.push_id, problems)
        await self.store.set_sync_state(
            {
                _KEY_CONFIG_VERSION: str(self._config_version)
                if self._config_version is not None
                else None,
                _KEY_LAST_PUSH: json.dumps(
                    {"push_id": push.push_id, "report": report.model_dump(mode="json")}
                ),
            }
        )
        return report

    async def _queue_report(self, report: ConfigReport) -> None:
        # Reports are kept until the broker has them, so one made just before
        # a power cut or while the link is down still reaches the district.
        raw = await self.store.sync_state(_KEY_PENDING_REPORTS)
        pending = json.loads(raw) if raw else []
        pending.append(report.model_dump(mode="json"))
        await self.store.set_sync_state({_KEY_PENDING_REPORTS: json.dumps(pending[-100:])})
        self._reports_waiting.set()

    async def _reporter(self, client: aiomqtt.Client) -> None:
        # Runs on every connection: reports left over when the last one broke go first.
        while True:
            # Cleared before reading, so a report queued after the read still wakes us.
            self._reports_waiting.clear()
            raw = await self.store.sync_state(_KEY_PENDING_REPORTS)
            pending = json.loads(raw) if raw else []
            if not pending:
                await self._reports_waiting.wait()
                continue
            for report in pending:
                await client.publish(self.topics.config_report, json.dumps(report).encode(), qos=1)
            # Only what was published is removed; a report queued meanwhile stays.
            raw_now = await self.store.sync_state(_KEY_PENDING_REPORTS)
            left = (json.loads(raw_now) if raw_now else [])[len(pending) :]
            await self.store.set_sync_state(
                {_KEY_PENDING_REPORTS: json.dumps(left) if left else None}
            )

    # --- housekeeping ---------------------------------------------------------

    async def _housekeeping(self) -> None:
        next_prune = 0.0
        while True:
            try:
                if time.monotonic() >= next_prune:
                    await self.prune()
                    next_prune = time.monotonic() + _PRUNE_EVERY_S
                await self._refresh_stats()
                age = self._oldest_age()
                if age is not None and age > _STALE_WARN_S:
                    log.warning(
                        "records wait for the district",
                        backlog=self._stats.backlog,
                        oldest_age_s=round(age),
                        connected=self.up,
                        rate_key="stale",
                    )
            except StoreError as exc:
                log.error("sync housekeeping failed", error=str(exc), rate_key="housekeeping")
            await asyncio.sleep(_STATS_EVERY_S)

    async def _refresh_stats(self, *, count_acked: bool = False) -> None:
        acked = self._stats.acked
        self._stats = await self.store.outbox_stats(count_acked=count_acked)
        if not count_acked:
            # Counting acknowledged rows scans the table; done at start and after pruning.
            self._stats = OutboxStats(
                self._stats.backlog, self._stats.oldest_id, self._stats.oldest_created_at, acked
            )
        self._stats_at = time.monotonic()
        self._publish_gauges()

    async def prune(self, now: float | None = None) -> int:
        """Delete acknowledged records older than the retention period; never unacked ones."""
        before = (self.clock() if now is None else now) - self.config.retention_days * 86400
        total = 0
        while True:
            n = await self.store.outbox_prune(before, _PRUNE_CHUNK)
            total += n
            if n < _PRUNE_CHUNK:
                break
            await asyncio.sleep(0)  # short transactions: the desk writes in between
        if total:
            await self._refresh_stats(count_acked=True)
            self.counters.pruned += total
            self.metrics.inc("gateway_sync_pruned_total", total)
            log.info("acknowledged outbox records pruned", records=total)
        return total
