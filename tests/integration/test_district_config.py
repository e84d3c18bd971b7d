"""A configuration pushed by the district: checked, put in force, kept; a bad one
changes nothing.  (The transport of pushes is tested with the sync.)"""

from __future__ import annotations

import asyncio
import os

from ..conftest import Broker, PtyPair, write_config
from ..e2e.village_short import write_short_village
from .helpers import running_gateway


def _first_step_person(gw) -> str:  # type: ignore[no-untyped-def]
    return gw.village.roster.escalation.steps[0].person


async def test_bad_push_refused_good_push_in_force_and_kept(tmp_path, pty_pair: PtyPair,
                                                            broker: Broker):
    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port,
                       village="push")
    write_short_village(tmp_path, cfg)
    roster = (tmp_path / "roster.toml").read_text()
    step = '[[escalation.step]]\nperson = "a"'
    assert step in roster
    async with running_gateway(cfg) as gw:
        assert _first_step_person(gw) == "a"
        bad = roster.replace(step, '[[escalation.step]]\nperson = "zhang"')
        problems = await gw.apply_district_config(2, {"roster.toml": bad})
        assert problems
        assert any("roster.toml" in p and "zhang" in p for p in problems), problems
        assert _first_step_person(gw) == "a"  # the old roster stays in force
        good = roster.replace(step, '[[escalation.step]]\nperson = "b"')
        assert await gw.apply_district_config(3, {"roster.toml": good}) == []
        assert _first_step_person(gw) == "b"
    assert (tmp_path / "district-config" / "current.json").exists()

    async with running_gateway(cfg) as gw:
        assert _first_step_person(gw) == "b"  # kept across a restart

    # IT staff edit the local file after the push: their edit wins.
    await asyncio.sleep(0.01)
    os.utime(tmp_path / "roster.toml")
    async with running_gateway(cfg) as gw:
        assert _first_step_person(gw) == "a"


async def test_a_push_that_cannot_be_kept_is_not_put_in_force(
    tmp_path, pty_pair: PtyPair, broker: Broker, monkeypatch
):
    import errno

    import pytest

    from gateway import runtime

    cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port,
                       village="push2")
    write_short_village(tmp_path, cfg)
    roster = (tmp_path / "roster.toml").read_text()
    step = '[[escalation.step]]\nperson = "a"'
    good = roster.replace(step, '[[escalation.step]]\nperson = "b"')

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with running_gateway(cfg) as gw:
        with monkeypatch.context() as patch:
            patch.setattr(runtime.os, "replace", disk_full)
            with pytest.raises(OSError, match="No space"):
                await gw.apply_district_config(2, {"roster.toml": good})
        # Not on disk, so not in force: a restart would bring back the old
        # roster, and the district is told the push failed.
        assert _first_step_person(gw) == "a"
        assert not (tmp_path / "district-config" / "current.json").exists()
        assert await gw.apply_district_config(2, {"roster.toml": good}) == []
        assert _first_step_person(gw) == "b"
    async with running_gateway(cfg) as gw:
        assert _first_step_person(gw) == "b"
