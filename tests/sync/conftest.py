"""Fixtures for the district sync: the reference central store as a real
process, on SQLite or on a throw-away PostgreSQL cluster of the tests' own."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.config import SyncConfig
from gateway.store import DeskWrites, Store

from ..conftest import IN_CI, REPO, free_port, wait_for_port

VILLAGE = "syncvillage"


# --- PostgreSQL ------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    """Debian keeps the server programs out of PATH, one folder per major version."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: int(Path(p).parts[-3].split(".")[0]))
        return Path(newest).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PgCluster:
    port: int

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> None:
        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn())
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(run())


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster on a free port, removed afterwards.

    It never touches a cluster the machine may already run (Debian's package
    starts one on 5432): its own data folder, port and socket folder.
    """
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        message = "PostgreSQL server programs are not installed (apt-get install postgresql)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    data = Path(tempfile.mkdtemp(prefix="onetouch-pg-"))  # /tmp: reachable by postgres
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root; the Debian package made this user.
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*pg_ctl, "-l", str(data / "server.log"), "-w", "-t", "60", "start", "-o",
             f"-p {port} -k {data} -c listen_addresses=127.0.0.1"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(data, ignore_errors=True)
        pytest.fail(f"could not start a PostgreSQL cluster: {exc.stderr.decode()[-2000:]}")
    wait_for_port(port)
    try:
        yield PgCluster(port)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


# --- the central database, as the tests inspect it --------------------------------


@dataclass
class CentralTarget:
    kind: str  # "sqlite" | "postgres"
    args: list[str]  # what the central store is started with
    path: Path | None = None
    dsn: str | None = None

    async def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            assert self.path is not None
            if not self.path.exists():
                return []
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
                try:
                    return conn.execute(sql).fetchall()
                except sqlite3.OperationalError:  # tables not made yet
                    return []
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    async def records(self) -> list[tuple[Any, ...]]:
        """(village, store, outbox_id, case_id, seq), in the order they were stored."""
        return await self._rows(
            "SELECT village, store, outbox_id, case_id, seq FROM records ORDER BY seq"
        )

    async def count(self) -> int:
        rows = await self._rows("SELECT COUNT(*) FROM records")
        return int(rows[0][0]) if rows else 0

    async def cases(self) -> dict[str, tuple[int, dict[str, Any]]]:
        rows = await self._rows("SELECT case_id, outbox_id, data FROM cases")
        return {
            r[0]: (int(r[1]), r[2] if isinstance(r[2], dict) else json.loads(r[2])) for r in rows
        }

    async def reports(self) -> list[tuple[Any, ...]]:
        return await self._rows("SELECT version, applied, problems FROM config_reports")


@pytest.fixture(params=["sqlite", "postgres"])
def central_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CentralTarget]:
    if request.param == "sqlite":
        path = tmp_path / "central.db"
        yield CentralTarget("sqlite", ["--db", f"sqlite:{path}"], path=path)
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = f"central_{uuid.uuid4().hex[:12]}"
    cluster.sql(f"CREATE DATABASE {name}")
    dsn = cluster.dsn(name)
    yield CentralTarget("postgres", ["--dsn", dsn], dsn=dsn)
    cluster.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sqlite_target(tmp_path: Path) -> CentralTarget:
    path = tmp_path / "central.db"
    return CentralTarget("sqlite", ["--db", f"sqlite:{path}"], path=path)


# --- the central store process --------------------------------------------------


@dataclass
class Central:
    """``python -m simulators.central_store`` as a subprocess; its JSON log lines kept."""

    port: int
    target: CentralTarget
    group: str = "central"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    def start(self, **env: str) -> Central:
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.central_store", "--mqtt", f"127.0.0.1:{self.port}",
             *self.target.args, "--group", self.group],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **self.env, **env},
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") == name:
                out.append(e)
        return out

    async def wait_for(self, name: str, n: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"central store never logged {name!r} x{n}; it said:\n{''.join(self.lines)}"
                )
            if self.proc is not None and self.proc.poll() is not None and name != "exited":
                raise AssertionError(
                    f"central store exited ({self.proc.returncode}):\n{''.join(self.lines)}"
                )
            await asyncio.sleep(0.02)

    async def ready(self) -> Central:
        await self.wait_for("ready")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def centrals() -> Iterator[list[Central]]:
    started: list[Central] = []
    yield started
    for c in started:
        c.kill()


# --- the gateway side ---------------------------------------------------------------


def sync_config(port: int, **overrides: Any) -> SyncConfig:
    """Fast timings so that a resend or a reconnect takes a fraction of a second."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": f"gw-{uuid.uuid4().hex[:8]}",
        "ack_timeout_s": 1.0,
        "retry_min_s": 0.1,
        "retry_max_s": 0.5,
        "poll_interval_s": 0.05,
        "keepalive_s": 5,
        "session_expiry_s": 600,
    }
    values.update(overrides)
    return SyncConfig(**values)


async def fill_outbox(store: Store, cases: int, versions: int, *, chunk: int = 2000) -> int:
    """``cases x versions`` case records, versions interleaved across cases as a
    busy village would make them; every tenth case also gets a follow-up record."""
    rows: list[tuple[str, str | None, dict[str, Any]]] = []
    for v in range(versions):
        for c in range(cases):
            case_id = f"c{c:05d}"
            rows.append(
                ("case", case_id, {"id": case_id, "state": "notifying", "v": v, "opened_at": 1.0})
            )
    total = len(rows)
    for i in range(0, total, chunk):
        await store.append([], desk=DeskWrites(outbox=rows[i : i + chunk], at=time.time()))
    return total


async def check_exactly_once(target: CentralTarget, store: Store, expected: int) -> None:
    """Every outbox record once, each case's records stored in outbox order, and
    each case's row the newest version."""
    store_id = await store.store_id()
    rows = await target.records()
    ids = [r[2] for r in rows]
    assert len(ids) == expected, f"{len(ids)} records at the district, {expected} made"
    assert len(set(ids)) == expected, "a record was stored twice"
    assert set(ids) == set(range(1, expected + 1))
    assert {(r[0], r[1]) for r in rows} == {(VILLAGE, store_id)}
    last: dict[str, int] = {}
    for _village, _store, outbox_id, case_id, _seq in rows:
        assert outbox_id > last.get(case_id, 0), f"case {case_id} out of order at {outbox_id}"
        last[case_id] = outbox_id
    cases = await target.cases()
    assert {k: v[0] for k, v in cases.items()} == last
    versions = {data["v"] for _oid, data in cases.values()}
    assert len(versions) == 1, f"cases not at their newest version: {sorted(versions)}"


async def wait_drained(store: Store, timeout: float = 30.0, what: str = "outbox") -> None:
    deadline = time.monotonic() + timeout
    while await store.outbox_count():
        if time.monotonic() > deadline:
            left = await store.outbox_count()
            raise AssertionError(f"{left} {what} records still unacknowledged after {timeout} s")
        await asyncio.sleep(0.05)
