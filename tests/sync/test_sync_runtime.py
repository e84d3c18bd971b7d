"""The sync inside the gateway: a press becomes a case at the district; the
contract's edges (batch size cap, database identity, configuration errors)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from firmware_protocol import Key
from gateway.config import ConfigError, load
from gateway.store import Store
from gateway.sync import Syncer
from gateway.sync_contract import Batch, ConfigPush
from simulators.caller import CounterFile, MqttBus, SimCaller

from ..conftest import Broker, write_config
from ..integration.helpers import caller_key, running_gateway
from .conftest import VILLAGE, Central, CentralTarget, fill_outbox, sync_config

DEV = 1007


async def test_a_press_becomes_a_case_at_the_district(
    tmp_path: Path, fresh_broker: Broker, sqlite_target: CentralTarget, centrals: list[Central]
) -> None:
    cfg = write_config(tmp_path, mqtt_port=fresh_broker.port, village=VILLAGE)
    with cfg.open("a") as fh:
        fh.write(f'\n[sync]\nhost = "127.0.0.1"\nport = {fresh_broker.port}\n')
    centrals.append(Central(fresh_broker.port, sqlite_target).start())
    await centrals[0].ready()
    async with running_gateway(cfg) as gw:
        bus = MqttBus("127.0.0.1", fresh_broker.port, f"onetouch/{VILLAGE}")
        caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
        bus.callers[DEV] = caller
        async with bus:
            assert (await caller.press(Key.CALL, give_up_s=5)).acked
        deadline = time.monotonic() + 10
        while f"{DEV}-1" not in await sqlite_target.cases():
            assert time.monotonic() < deadline, gw.syncer.status()
            await asyncio.sleep(0.05)
        status = gw.syncer.status()
        assert status["connected"] is True
        assert status["topic_prefix"] == f"district/{VILLAGE}"
    _oid, data = (await sqlite_target.cases())[f"{DEV}-1"]
    assert data["device_id"] == DEV
    assert data["state"] in ("notifying", "opened")


async def test_a_batch_is_cut_at_its_byte_limit_and_matches_the_schema(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "gw.db")
    try:
        await fill_outbox(store, cases=50, versions=2)
        syncer = Syncer(
            sync_config(1, batch_max_bytes=4096),
            village_id=VILLAGE,
            store=store,
            apply_config=_unused,
        )
        syncer._store_id = await store.store_id()
        rows = await store.outbox_batch(0, 500)
        batch_id, payload, ids = syncer._encode(rows)
        assert len(payload) <= 4096
        assert 1 < len(ids) < len(rows)
        batch = Batch.model_validate_json(payload)
        assert [r.id for r in batch.records] == ids == list(range(1, len(ids) + 1))
        assert batch.batch == batch_id == f"1-{len(ids)}"
        assert batch.records[0].payload == json.loads(rows[0].payload)
        # One record larger than the limit still goes, alone, rather than never.
        tiny = Syncer(
            sync_config(1, batch_max_bytes=1024),
            village_id=VILLAGE,
            store=store,
            apply_config=_unused,
        )
        big = rows[0].__class__(999, "case", "big", 1.0, True, json.dumps({"x": "y" * 5000}))
        assert tiny._encode([big, rows[1]])[2] == [999]
    finally:
        await store.close()


async def test_each_database_has_its_own_lasting_identity(tmp_path: Path) -> None:
    a = await Store.open(tmp_path / "a.db")
    first = await a.store_id()
    await a.close()
    a = await Store.open(tmp_path / "a.db")
    b = await Store.open(tmp_path / "b.db")
    try:
        assert await a.store_id() == first
        assert await b.store_id() != first
    finally:
        await a.close()
        await b.close()


def test_sync_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, mqtt_port=1883)
    with cfg.open("a") as fh:
        fh.write('\n[sync]\nhost = "d.example"\nca_file = "ca.pem"\nretry_min_s = 0\n')
    with pytest.raises(ConfigError) as err:
        load(cfg)
    text = "\n".join(err.value.problems)
    assert "sync.retry_min_s" in text
    cfg.write_text(cfg.read_text().replace("retry_min_s = 0\n", ""))
    with pytest.raises(ConfigError, match="ca_file is set but tls = false"):
        load(cfg)
    with_tls = cfg.read_text().replace('ca_file = "ca.pem"', 'tls = true\nca_file = "ca.pem"')
    cfg.write_text(with_tls)
    loaded = load(cfg).gateway
    assert loaded.sync is not None
    assert loaded.sync.ca_file == tmp_path / "ca.pem"


def test_a_push_may_replace_only_the_three_district_files() -> None:
    with pytest.raises(ValueError, match=r"\['gateway.toml'\] cannot be pushed"):
        ConfigPush(village=VILLAGE, version=2, push_id="p", files={"gateway.toml": ""})


async def _unused(version: int, files: dict[str, str]) -> list[str]:
    raise AssertionError("not called")
