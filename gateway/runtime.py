"""Wires the gateway together and runs it: store, intake, links, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import malloc
from .clock import WallClock
from .config import DISTRICT_DIR, ConfigError, Loaded, ModemConfig, district_overrides, load
from .desk import Desk
from .dispatch import Dispatcher
from .events import CallerEvent, HeartbeatReceived, KeyPressed
from .intake import Intake
from .links import MqttLink, SerialLink
from .log import get_logger
from .metrics import Metrics
from .notify import Channel, Outgoing
from .notify.app import AppChannel
from .sdnotify import Notifier
from .status import status_path, write_status
from .store import Store, StoreError

__all__ = ["SHUTDOWN_GRACE_S", "Gateway"]

log = get_logger("gateway.runtime")

# SIGTERM: frames already received get this long to reach the disk and be
# acknowledged; systemd's stop timeout is set well above it.
SHUTDOWN_GRACE_S = 5.0
# Heartbeats older than a week are of no more use (presses and cases are kept).
HEARTBEAT_KEEP_S = 7 * 86400.0
PRUNE_EVERY_S = 3600.0


class Gateway:
    def __init__(
        self, loaded: Loaded, *, metrics: Metrics | None = None, notifier: Notifier | None = None
    ) -> None:
        self.config = loaded.gateway
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        # Only the keys are kept: the residents' pydantic models cost about
        # 6 MB with 10,000 callers, and the desk has its own copy of the rest.
        self._keys = {c.id: c.key_bytes for c in loaded.residents.caller}
        self.started_at = time.time()
        self.stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self.village = loaded.village
        self.desk = Desk(loaded.village)
        self.store: Store | None = None
        self.intake: Intake | None = None
        self.dispatcher: Dispatcher | None = None
        self.channels: dict[str, Channel] = {}
        self.modem: Any = None  # gateway.notify.modem.Modem when [modem] is configured
        self.phone_answers: Any = None
        self.metrics_server: Any = None
        self._backlog: int | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.links: list[Any] = []
        self.syncer: Any = None  # gateway.sync.Syncer when [sync] is configured

    def _on_event(self, event: CallerEvent) -> None:
        if isinstance(event, KeyPressed):
            self.metrics.inc("gateway_presses_total", key=event.key.name.lower())
            log.info(
                "key press stored",
                device=event.device_id,
                key=event.key.name.lower(),
                counter=event.counter,
                link=event.link,
            )
        elif isinstance(event, HeartbeatReceived):
            log.debug("heartbeat stored", device=event.device_id, battery_mv=event.battery_mv)

    async def run(self) -> None:
        cfg = self.config
        store = await Store.open(cfg.store.path, synchronous=cfg.store.synchronous)
        self.store = store
        try:
            clock = WallClock(cfg.clock.trust)
            intake = Intake(
                store,
                self._keys.get,
                metrics=self.metrics,
                clock=clock,
                max_batch=cfg.intake.max_batch,
                on_event=self._on_event,
            )
            await intake.load()
            self.intake = intake
            self.links = [SerialLink(s, intake.submit, self.metrics) for s in cfg.links.serial]
            channels = self.channels
            if cfg.links.mqtt is not None:
                mqtt = MqttLink(
                    cfg.links.mqtt,
                    topic_prefix=cfg.topic_prefix,
                    client_id=cfg.mqtt_client_id,
                    submit=intake.submit,
                    metrics=self.metrics,
                )
                self.links.append(mqtt)
                channels["app"] = AppChannel(
                    mqtt,
                    cfg.topic_prefix,
                    people=self.village.people,
                    on_answer=intake.submit_event,
                    metrics=self.metrics,
                )
            intake.links = list(self.links)
            if cfg.modem is not None:
                self._modem_channels(cfg.modem, intake)
            dispatcher = Dispatcher(
                self.desk,
                self.village,
                store=store,
                channels=channels,
                send_feedback=intake.send_feedback,
                metrics=self.metrics,
                clock=clock,
            )
            intake.attach(dispatcher)
            self.dispatcher = dispatcher
            from .village import check_coverage

            for problem in check_coverage(self.village, datetime.now(UTC)):
                # Serve what can be served, but say loudly what cannot.
                log.error("roster gap: some calls would find nobody", problem=problem)
            # Open cases resume where they were: same step, same wall-clock deadline.
            state = await store.load_desk_state(
                now=clock.now(), rating_window_s=self.village.settings.rating_window_s
            )
            dispatcher.rearm(self.desk.restore(state.cases, state.notices, state.last_seen))
            if state.cases:
                log.info(
                    "cases restored",
                    open=sum(c.open for c in state.cases),
                    deadlines=len(self.desk.pending_deadlines()),
                )
            if cfg.metrics is not None:
                from .prometheus import MetricsServer

                self.metrics_server = MetricsServer(
                    self.metrics,
                    cfg.metrics.host,
                    cfg.metrics.port,
                    extra=self._metric_extras,
                    refresh=self._refresh_metrics,
                )
                await self.metrics_server.start()
            committer = asyncio.create_task(intake.run(), name="intake")
            ticker = asyncio.create_task(dispatcher.tick(), name="tick")
            link_tasks = [asyncio.create_task(link.run(), name=link.name) for link in self.links]
            if self.modem is not None:
                link_tasks.append(asyncio.create_task(self.modem.run(), name="modem"))
            # --- district sync (issue 5): runs and stops with the links. ---
            if cfg.sync is not None:
                from .sync import Syncer

                self.syncer = Syncer(
                    cfg.sync,
                    village_id=cfg.village.id,
                    store=store,
                    apply_config=self.apply_district_config,
                    metrics=self.metrics,
                )
                link_tasks.append(asyncio.create_task(self.syncer.run(), name="sync"))
            try:
                await self._wait_ready()
                self.ready.set()
                log.info(
                    "gateway ready",
                    village=cfg.village.id,
                    callers=len(self._keys),
                    links=[link.name for link in self.links],
                    store=str(cfg.store.path),
                )
                self.notifier.notify(ready=1, status=self.status_line())
                malloc.trim()
                supervision = asyncio.create_task(self._supervise(), name="supervise")
                try:
                    await self._until_stopped([committer, ticker, *link_tasks, supervision])
                finally:
                    self.notifier.notify(stopping=1, status="stopping")
                    await _cancel([supervision])
            finally:
                # New frames stop first; what was already received is committed
                # and acknowledged before the store closes.
                await _cancel(link_tasks)
                await _cancel([ticker])
                dispatcher.stop()
                if self.metrics_server is not None:
                    await self.metrics_server.stop()
                await intake.drain(SHUTDOWN_GRACE_S)
                await _cancel([committer])
        finally:
            await store.close()
            with contextlib.suppress(OSError):
                write_status(
                    status_path(cfg.store.path),
                    {**self.status_snapshot(), "stopped_at": time.time()},
                )
            log.info("gateway stopped")

    def _modem_channels(self, cfg: ModemConfig, intake: Intake) -> None:
        from .notify.answers import PhoneAnswers
        from .notify.modem import Modem, SmsChannel, VoiceChannel, reset_command

        self.phone_answers = PhoneAnswers(
            people=self.village.people,
            desk=lambda: self.desk,
            submit=intake.submit_event,
            metrics=self.metrics,
        )
        self.modem = Modem(
            cfg.port,
            baudrate=cfg.baudrate,
            metrics=self.metrics,
            pin=cfg.pin,
            on_sms=self.phone_answers.on_sms,
            soft_reset="at" in cfg.reset,
            reset=(
                reset_command(cfg.reset_command, timeout_s=cfg.reset_command_timeout_s)
                if cfg.reset_command is not None and "command" in cfg.reset
                else None
            ),
            reset_boot_s=cfg.reset_boot_s,
            reset_order=cfg.reset,
        )
        sms_options: dict[str, Any] = {}
        if cfg.sms_template is not None:
            sms_options["template"] = cfg.sms_template
        if cfg.how_to_answer is not None:
            sms_options["how_to_answer"] = cfg.how_to_answer
        self.channels["sms"] = SmsChannel(self.modem, details=self._message_details, **sms_options)
        self.channels["voice"] = VoiceChannel(
            self.modem,
            ring_s=cfg.ring_s,
            accept_digit=cfg.accept_digit or None,
            answered_call_accepts=cfg.answered_call_accepts,
            on_outcome=self.phone_answers.on_call,
        )

    def _message_details(self, message: Outgoing) -> dict[str, str]:
        case = self.desk.cases.get(message.case_id) if message.case_id else None
        caller = self.village.callers.get(case.device_id) if case is not None else None
        if caller is None:
            return {}
        return {"resident": caller.resident, "address": caller.address}

    def _metric_extras(self) -> dict[str, Any]:
        snap = self.desk.snapshot()
        by_state: dict[str, int] = {}
        for case in snap.cases:
            by_state[case.state.value] = by_state.get(case.state.value, 0) + 1
        return {
            "gateway_cases": by_state,
            "gateway_callers_offline": sum(1 for n in snap.notices if n.kind.value == "offline"),
            "gateway_backlog_records": self._backlog,
        }

    async def _refresh_metrics(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self._backlog = await self.store.outbox_count()

    def status_line(self) -> str:
        up = [link.name for link in self.links if link.up]
        down = [link.name for link in self.links if not link.up]
        stored = self.intake.stored_events if self.intake is not None else 0
        text = f"links up: {', '.join(up) or 'none'}"
        if down:
            text += f"; DOWN: {', '.join(down)}"
        if self.modem is not None:
            text += "; modem " + (
                f"ready (signal {self.modem.signal_csq})"
                if self.modem.ready
                else f"NOT READY ({self.modem.last_error or 'starting'})"
            )
        snap = self.desk.snapshot()
        open_cases = sum(1 for c in snap.cases if c.open)
        now = time.time()
        allowance = self.village.settings.heartbeat_allowance_s
        heard = sum(
            1 for d, t in snap.last_seen.items() if d in self._keys and now - t <= allowance
        )
        text += f"; callers heard: {heard}/{len(self._keys)}; open cases: {open_cases}"
        if self._backlog is not None:
            text += f"; to district: {self._backlog}"
        return f"{text}; events stored since start: {stored}"

    async def _supervise(self) -> None:
        """Watchdog pings and the status line, from the event loop itself.

        The pings come from a coroutine, not a thread, so that a blocked loop
        stops them and systemd restarts the gateway.
        """
        watchdog = self.notifier.watchdog_interval_s
        period = min(watchdog, 10.0) if watchdog is not None else 10.0
        last_status = ""
        next_prune = time.monotonic() + 60.0  # not in the middle of start-up
        while True:
            fields: dict[str, str | int] = {}
            if watchdog is not None:
                fields["watchdog"] = 1
            await self._refresh_metrics()  # the district backlog, for the status line
            status = self.status_line()
            if status != last_status:
                fields["status"] = last_status = status
            if fields:
                self.notifier.notify(**fields)
            try:
                write_status(status_path(self.config.store.path), self.status_snapshot())
            except OSError as exc:
                log.warning("status file not written", error=str(exc), rate_key="status")
            if time.monotonic() >= next_prune and self.store is not None:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                try:
                    pruned = await self.store.prune_heartbeats(time.time() - HEARTBEAT_KEEP_S)
                except StoreError as exc:
                    log.warning("old heartbeats not pruned", error=str(exc), rate_key="prune")
                else:
                    if pruned:
                        log.info("old heartbeats pruned", rows=pruned)
            await asyncio.sleep(period)

    def status_snapshot(self) -> dict[str, Any]:
        """What `onetouch-gateway status` shows; written beside the database."""
        now = time.time()
        snap = self.desk.snapshot()
        allowance = self.village.settings.heartbeat_allowance_s
        heard = {d for d, t in snap.last_seen.items() if now - t <= allowance}
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": now,
            "village": self.config.village.id,
            "links": {link.name: bool(link.up) for link in self.links},
            "callers": len(self._keys),
            "callers_heard": len(heard & set(self._keys)),
            "open_cases": sum(1 for c in snap.cases if c.open),
            "notices": [
                {"device": n.device_id, "kind": n.kind.value, "since": n.since}
                for n in snap.notices
            ],
            "events_stored": self.intake.stored_events if self.intake else 0,
        }

    async def _wait_ready(self) -> None:
        # Links that cannot come up are retried in the background; do not hold
        # the whole gateway hostage to one unplugged adapter for long.
        waits = [asyncio.create_task(link.connected.wait()) for link in self.links]
        stop = asyncio.create_task(self.stop_requested.wait())
        pending: set[asyncio.Task[Any]] = set(waits)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while pending and not stop.done() and loop.time() < deadline:
            _done, pending = await asyncio.wait(
                [*pending, stop],
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            pending.discard(stop)
        for task in [*pending, stop]:
            task.cancel()
        down = [link.name for link in self.links if not link.up]
        if down:
            log.warning("starting with links down; they keep retrying", links=down)

    async def _until_stopped(self, tasks: list[asyncio.Task[Any]]) -> None:
        stop = asyncio.create_task(self.stop_requested.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in done:
            if task is not stop and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def _hangup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload_from_disk())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_from_disk(self) -> list[str]:
        """SIGHUP: read the configuration files again; a bad one changes nothing."""
        log.info("reloading the configuration", config=str(self.config.source))
        try:
            loaded = load(self.config.source)
        except ConfigError as exc:
            problems = exc.problems
        else:
            problems = await self.reconfigure(loaded)
        for problem in problems:
            log.error("configuration NOT reloaded; the running one stays", problem=problem)
        return problems

    async def apply_district_config(self, version: int, files: dict[str, str]) -> list[str]:
        """A configuration the district pushed: check it like check-config, put it
        in force without dropping open cases, and keep it for the next start.
        A push with any problem changes nothing."""
        base = self.config.store.path.parent / DISTRICT_DIR
        # The folder is not used until current.json names it, so a push that
        # fails half-way, or a power cut, leaves the configuration in force alone.
        folder = base / f"v{version}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
        overrides = {**district_overrides(self.config), **{n: folder / n for n in files}}
        try:
            loaded = load(self.config.source, overrides=overrides)
        except ConfigError as exc:
            problems = exc.problems
        else:
            problems = self._refusals(loaded)
        if problems:
            shutil.rmtree(folder, ignore_errors=True)
            return [p.replace(str(folder) + "/", "") for p in problems]
        # Older pushed files still in force are carried into this version's folder.
        in_force = sorted(overrides)
        for name in in_force:
            if name not in files:
                shutil.copy2(overrides[name], folder / name)
        # On disk first, in force second: a power cut in between must bring back
        # at the next start what the district is about to be told is applied.
        for name in in_force:
            _fsync(folder / name)
        _fsync(folder)
        record = {"version": version, "files": in_force, "applied_at": time.time()}
        tmp = base / "current.json.tmp"
        tmp.write_text(json.dumps(record))
        _fsync(tmp)
        os.replace(tmp, base / "current.json")
        _fsync(base)
        await self._put_in_force(loaded)
        log.info("district configuration in force", version=version, files=sorted(files))
        return []

    async def reconfigure(self, loaded: Loaded) -> list[str]:
        """Swap in new residents, people and roster between two batches.

        Open cases carry on with their step and deadline; problems (the same
        ones check-config reports) refuse the whole change.
        """
        problems = self._refusals(loaded)
        if not problems:
            await self._put_in_force(loaded)
        return problems

    def _refusals(self, loaded: Loaded) -> list[str]:
        """Why *loaded* cannot be put in force now; empty when it can."""
        from .village import check_coverage

        problems = check_coverage(loaded.village, datetime.now(UTC))
        if not problems and (self.intake is None or self.dispatcher is None):
            problems = ["the gateway is still starting; try again"]
        return problems

    async def _put_in_force(self, loaded: Loaded) -> None:
        assert self.intake is not None
        assert self.dispatcher is not None
        new = loaded.gateway
        # Only residents, people and roster are swapped while running; say so
        # for every other section that changed rather than ignore it silently.
        later = [
            name
            for name in ("village", "store", "links", "modem", "sync", "metrics", "intake",
                         "clock", "log")
            if getattr(self.config, name) != getattr(new, name)
        ]
        async with self.intake.commit_lock:
            snap = self.desk.snapshot()
            desk = Desk(loaded.village)
            desk.restore(snap.cases, snap.notices, snap.last_seen)
            self.desk, self.village = desk, loaded.village
            # Mutated in place: the intake holds this dict's lookup.
            self._keys.clear()
            self._keys.update({c.id: c.key_bytes for c in loaded.residents.caller})
            self.dispatcher.replace(desk, loaded.village)
            app = self.channels.get("app")
            if isinstance(app, AppChannel):
                app.set_people(loaded.village.people)
            if self.phone_answers is not None:
                self.phone_answers.set_people(loaded.village.people)
        log.info(
            "configuration reloaded",
            callers=len(self._keys),
            people=len(loaded.village.people),
            open_cases=sum(c.open for c in snap.cases),
        )
        malloc.trim()
        if later:
            log.warning("these settings take effect at the next restart", sections=later)

    def _signalled(self, sig: signal.Signals) -> None:
        log.info("stop requested", signal=sig.name)
        self.stop_requested.set()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
