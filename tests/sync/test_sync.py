"""The outbox reaches the district exactly once and in order, whatever fails.

Real parts: a private mosquitto, the reference central store as a process on
SQLite or PostgreSQL, the gateway's SQLite store, the Syncer in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_residents
from gateway.metrics import Metrics
from gateway.store import Store
from gateway.sync import Syncer

from ..conftest import REPO, Broker
from .conftest import (
    VILLAGE,
    Central,
    CentralTarget,
    check_exactly_once,
    fill_outbox,
    sync_config,
    wait_drained,
)


async def _no_push(version: int, files: dict[str, str]) -> list[str]:
    return ["not in this test"]


@contextlib.asynccontextmanager
async def running_syncer(
    store: Store, port: int, *, apply_config: Any = _no_push, **overrides: Any
) -> AsyncIterator[Syncer]:
    syncer = Syncer(
        sync_config(port, **overrides),
        village_id=VILLAGE,
        store=store,
        apply_config=apply_config,
        metrics=Metrics(),
    )
    task = asyncio.create_task(syncer.run())
    try:
        await asyncio.wait_for(syncer.connected.wait(), 10)
        yield syncer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def gateway_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "gateway.db")
    try:
        yield store
    finally:
        await store.close()


async def test_backlog_built_while_the_store_is_down_arrives_once_in_order(
    tmp_path: Path,
    fresh_broker: Broker,
    central_target: CentralTarget,
    centrals: list[Central],
) -> None:
    async with gateway_store(tmp_path) as store, running_syncer(store, fresh_broker.port) as sync:
        total = await fill_outbox(store, cases=1000, versions=10)
        assert total == 10_000
        # Nobody consumes: the first batch is sent again and again, nothing is lost.
        deadline = time.monotonic() + 10
        while sync.status()["resends"] < 2:
            assert time.monotonic() < deadline, sync.status()
            await asyncio.sleep(0.05)
        assert await store.outbox_count() == total
        while sync.status()["backlog"] != total:  # the figure is refreshed every 2 s
            assert time.monotonic() < deadline, sync.status()
            await asyncio.sleep(0.05)
        status = sync.status()
        assert status["oldest_id"] == 1
        assert status["oldest_age_s"] is not None
        assert sync.metrics.get("gateway_sync_backlog") == total
        # Two workers share the stream through one MQTT 5 shared subscription.
        for _ in range(2):
            centrals.append(Central(fresh_broker.port, central_target).start())
        for c in centrals:
            await c.ready()
        await wait_drained(store)
        await check_exactly_once(central_target, store, total)
        assert all(c.events("batch committed") for c in centrals), "a worker got no batch"
        assert sync.status()["records_acked"] == total


async def test_broker_restarted_in_the_middle_of_a_batch(
    tmp_path: Path,
    fresh_broker: Broker,
    central_target: CentralTarget,
    centrals: list[Central],
) -> None:
    # Each commit takes 0.3 s, so a batch is in flight when the broker goes.
    slow = {"CENTRAL_STORE_COMMIT_DELAY_S": "0.3"}
    central = Central(fresh_broker.port, central_target, env=slow)
    centrals.append(central.start())
    await central.ready()
    async with gateway_store(tmp_path) as store, running_syncer(store, fresh_broker.port) as sync:
        total = await fill_outbox(store, cases=300, versions=10)
        await central.wait_for("batch committed", 2)
        deadline = time.monotonic() + 5
        while sync.status()["in_flight"] is None:  # the next batch is being read
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        fresh_broker.restart()
        await wait_drained(store)
        await check_exactly_once(central_target, store, total)
        assert central.proc is not None
        assert central.proc.poll() is None, "the central store should have reconnected"


async def test_central_store_killed_between_commit_and_acknowledgement(
    tmp_path: Path,
    fresh_broker: Broker,
    central_target: CentralTarget,
    centrals: list[Central],
) -> None:
    hook = {"CENTRAL_STORE_EXIT_AFTER_COMMIT": "2"}
    doomed = Central(fresh_broker.port, central_target, env=hook)
    centrals.append(doomed.start())
    await doomed.ready()
    async with gateway_store(tmp_path) as store, running_syncer(store, fresh_broker.port):
        total = await fill_outbox(store, cases=200, versions=10)
        assert doomed.proc is not None
        await asyncio.to_thread(doomed.proc.wait, 20)
        assert doomed.proc.returncode == 3, "".join(doomed.lines)
        # The second batch is committed at the district but not acknowledged here.
        assert await central_target.count() == 1000
        assert await store.outbox_count() == total - 500
        centrals.append(Central(fresh_broker.port, central_target).start())
        await centrals[-1].ready()
        await wait_drained(store)
        await check_exactly_once(central_target, store, total)
        # The resent batch was recognised, not stored again.
        assert any(e["duplicates"] == 500 for e in centrals[-1].events("batch committed"))


async def test_acknowledged_records_are_pruned_after_retention_and_unacked_never(
    tmp_path: Path,
    fresh_broker: Broker,
    sqlite_target: CentralTarget,
    centrals: list[Central],
) -> None:
    centrals.append(Central(fresh_broker.port, sqlite_target).start())
    await centrals[0].ready()
    async with gateway_store(tmp_path) as store:
        async with running_syncer(store, fresh_broker.port, retention_days=1) as sync:
            total = await fill_outbox(store, cases=10, versions=10)
            await wait_drained(store)
            # Not yet old enough.
            assert await sync.prune() == 0
        await fill_outbox(store, cases=5, versions=1)  # made after the district went away
        syncer = Syncer(
            sync_config(fresh_broker.port, retention_days=1),
            village_id=VILLAGE,
            store=store,
            apply_config=_no_push,
        )
        pruned = await syncer.prune(now=time.time() + 2 * 86400)
        stats = await store.outbox_stats()
        assert pruned == total  # every acknowledged record
        assert stats.backlog == 5  # and no unacknowledged one
        # The newest row is kept even when acknowledged, so a new record never
        # reuses a pruned id (the district would drop it as one it already has).
        everything_acked = await store.outbox_batch(0, 100)
        await store.outbox_ack([r.id for r in everything_acked], time.time())
        assert await syncer.prune(now=time.time() + 2 * 86400) == 4
        await fill_outbox(store, cases=1, versions=1)
        newest = await store.outbox_batch(0, 10)
        assert [r.id for r in newest] == [total + 5 + 1]


async def test_config_push_with_an_error_is_rejected_and_the_old_config_stays(
    tmp_path: Path,
    fresh_broker: Broker,
    sqlite_target: CentralTarget,
    centrals: list[Central],
) -> None:
    """The district pushes a roster naming a person who does not exist: the
    gateway reports the exact problem and keeps running the roster it had."""
    from gateway.village import load_village

    config = REPO / "config"
    current: dict[str, Any] = {"version": 1, "files": _read(config)}
    applied: list[int] = []

    async def apply_config(version: int, files: dict[str, str]) -> list[str]:
        # The same checks as check-config, on the new files over the old ones,
        # in a scratch folder; the live configuration changes only if all pass.
        merged = {**current["files"], **files}
        scratch = Path(tempfile.mkdtemp(dir=tmp_path))
        for name, text in merged.items():
            (scratch / name).write_text(text)
        try:
            residents = load_residents(scratch / "residents.toml")
            load_village(scratch / "people.toml", scratch / "roster.toml", residents)
        except ConfigError as exc:
            return [p.replace(str(scratch) + "/", "") for p in exc.problems]
        current.update(version=version, files=merged)
        applied.append(version)
        return []

    centrals.append(Central(fresh_broker.port, sqlite_target).start())
    await centrals[0].ready()
    good_roster = (config / "roster.toml").read_text()
    bad_roster = good_roster.replace('person = "wang-shuji"', 'person = "nobody-here"', 1)
    assert bad_roster != good_roster
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "roster.toml").write_text(bad_roster)
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "roster.toml").write_text(good_roster + "\n# v2\n")

    async with (
        gateway_store(tmp_path) as store,
        running_syncer(store, fresh_broker.port, apply_config=apply_config) as sync,
    ):
        before = dict(current["files"])
        code, out = await _push(fresh_broker.port, 2, tmp_path / "bad" / "roster.toml")
        assert code == 1, out
        assert "rejected" in out
        assert "nobody-here" in out  # the exact problem, naming the value
        assert current["files"] == before
        assert current["version"] == 1
        assert applied == []

        code, out = await _push(fresh_broker.port, 2, tmp_path / "good" / "roster.toml")
        assert code == 0, out
        assert "applied" in out
        assert current["version"] == 2
        assert current["files"]["roster.toml"].endswith("# v2\n")

        code, out = await _push(fresh_broker.port, 2, tmp_path / "good" / "roster.toml")
        assert code == 1, out
        assert "not newer than the version in force (2)" in out
        assert sync.status()["config_version"] == 2
        assert sync.status()["config_pushes"] == {"applied": 1, "rejected": 2}

    # The district's store kept every report.
    await centrals[0].wait_for("config report", 3)
    reports = await sqlite_target.reports()
    assert sorted((v, bool(a)) for v, a, _p in reports) == [(2, False), (2, False), (2, True)]


def _read(folder: Path) -> dict[str, str]:
    return {n: (folder / n).read_text() for n in ("people.toml", "roster.toml", "residents.toml")}


async def _push(port: int, version: int, *files: Path, timeout: float = 10) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.central_store", "--mqtt", f"127.0.0.1:{port}",
        "push-config", "--village", VILLAGE, "--version", str(version), "--timeout", str(timeout),
        *map(str, files),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_a_push_made_while_the_gateway_is_offline_is_applied_when_it_returns(
    tmp_path: Path,
    fresh_broker: Broker,
    sqlite_target: CentralTarget,
    centrals: list[Central],
) -> None:
    """The gateway's persistent session keeps the push at the broker; the report
    then reaches the district's store although the pusher gave up waiting."""
    got: list[tuple[int, dict[str, str]]] = []

    async def apply_config(version: int, files: dict[str, str]) -> list[str]:
        got.append((version, files))
        return []

    centrals.append(Central(fresh_broker.port, sqlite_target).start())
    await centrals[0].ready()
    roster = REPO / "config" / "roster.toml"
    async with gateway_store(tmp_path) as store:
        async with running_syncer(store, fresh_broker.port, client_id="gw-offline"):
            pass  # the session exists at the broker from now on
        code, out = await _push(fresh_broker.port, 5, roster, timeout=1)
        assert code == 3, out
        assert "no report" in out
        async with running_syncer(
            store, fresh_broker.port, client_id="gw-offline", apply_config=apply_config
        ) as sync:
            await centrals[0].wait_for("config report")
            assert sync.status()["config_version"] == 5
    assert got == [(5, {"roster.toml": roster.read_text()})]
    reports = await sqlite_target.reports()
    assert [(v, bool(a)) for v, a, _p in reports] == [(5, True)]
