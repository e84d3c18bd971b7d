"""A call's outcome inside the running gateway: recorded on the case, and a call
nobody picked up is a channel that failed, so the desk moves on at once.

The gateway runs in-process with a serial caller on a socat pair and the
modem simulator on its own pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_protocol import Key
from gateway.runtime import Gateway
from simulators.caller import CounterFile, SerialBus, SimCaller
from simulators.modem import ModemSim, Phone, Scenario

from ..conftest import PtyPair, write_config
from ..e2e.village_short import use_village
from .helpers import caller_key, running_gateway, wait_until

DEV = 1009
CASE = f"{DEV}-1"
A_PHONE, B_PHONE = "13900000001", "13900000002"

PEOPLE = f"""
[[grid]]
id = "grid-1"
[[grid]]
id = "grid-2"
[[grid]]
id = "grid-3"

[[person]]
id = "a"
name = "甲书记"
role = "secretary"
phone = "{A_PHONE}"
channels = ["voice", "sms"]

[[person]]
id = "b"
name = "乙副书记"
role = "deputy"
phone = "{B_PHONE}"
channels = ["sms"]

[[person]]
id = "t"
name = "镇值班"
role = "town_duty"
phone = "13900000009"
channels = ["sms"]

[[person]]
id = "g"
name = "网格长"
role = "grid_leader"
phone = "13900000003"
grids = ["grid-1", "grid-2", "grid-3"]
channels = ["sms"]
"""

# a's step is long: moving on before it ends can only be the call's doing.
ROSTER = """
timezone = "Asia/Shanghai"
[[shift]]
days = ["daily"]
start = "00:00"
end = "24:00"
person = "a"
[escalation]
repeat = 0
exhausted = { role = "town_duty" }
[[escalation.step]]
person = "a"
ack_timeout_s = 120
[[escalation.step]]
person = "b"
ack_timeout_s = 120
"""


@contextlib.asynccontextmanager
async def village(
    tmp_path: Path, pty_pair: PtyPair, phone_a: Phone, modem_extra: str = ""
) -> AsyncIterator[tuple[Gateway, ModemSim, SimCaller]]:
    link = tmp_path / "ttyMODEM"
    # No DTMF: an answered call is hung up after a second and a half, not after
    # the window left for a key.
    scenario = Scenario(phones={A_PHONE: phone_a}, dtmf=None)
    async with ModemSim(None, scenario, link=link) as sim:
        cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, village="calls")
        use_village(cfg, PEOPLE, ROSTER)
        with cfg.open("a") as fh:
            fh.write(f'\n[modem]\nport = "{link}"\nring_s = 5\n{modem_extra}')
        async with running_gateway(cfg) as gw:
            assert gw.modem is not None
            await wait_until(lambda: gw.modem is not None and gw.modem.ready, timeout=15,
                             what="the modem")  # fmt: skip
            bus = SerialBus(str(pty_pair.device_port))
            caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send)
            bus.callers[DEV] = caller
            async with bus:
                assert (await caller.press(Key.CALL, give_up_s=5)).acked
                yield gw, sim, caller


async def _rows(gw: Gateway, at_least: int = 0) -> list[tuple[str, str, str]]:
    """The case's notification rows, waiting a while for ``at_least`` of them."""
    assert gw.store is not None
    for _ in range(100):
        rows = [
            (n["person_id"], n["channel"], n["outcome"])
            for n in await gw.store.notifications(CASE)
        ]
        if len(rows) >= at_least:
            break
        await asyncio.sleep(0.1)
    return rows


def _journal(db: Path) -> list[dict[str, object]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT data FROM desk_events WHERE kind = 'notify_failed' ORDER BY id"
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


@pytest.mark.parametrize(
    ("phone", "outcome"),
    [
        (Phone(busy=True), "busy"),
        (Phone(reject=True, reject_quirk=True), "rejected"),
        (Phone(), "no_answer"),
    ],
)
async def test_unanswered_call_is_recorded_and_moves_on_at_once(
    tmp_path: Path, pty_pair: PtyPair, phone: Phone, outcome: str
):
    async with village(tmp_path, pty_pair, phone) as (gw, sim, _caller):
        loop = asyncio.get_running_loop()
        pressed = loop.time()
        await wait_until(lambda: gw.desk.cases[CASE].current == "b", timeout=20,
                         what="the case to move on to b")  # fmt: skip
        moved_after = loop.time() - pressed
        await wait_until(lambda: any(s.number == B_PHONE for s in sim.sms_sent), timeout=10,
                         what="b to be texted")  # fmt: skip
        rows = await _rows(gw, 4)
        assert gw.store is not None
        case = await gw.store.case(CASE)
    assert moved_after < 15  # the call's ring time, not a's 120-second step
    assert rows[:4] == [
        ("a", "voice", "sent"),
        ("a", "sms", "sent"),  # the text that went with the call
        ("a", "voice", outcome),
        ("b", "sms", "sent"),
    ], rows
    assert case is not None
    moved = next(t for t in case.transitions if t.cause == "unreachable")
    assert f"甲书记 via voice: {outcome}" in moved.detail
    # Journalled like every desk event: it is on disk with its consequences.
    (event,) = _journal(tmp_path / "gateway.db")
    assert event == {
        "person_id": "a",
        "case_id": CASE,
        "channel": "voice",
        "reason": outcome,
        "along": ["sms"],
    }


async def test_picked_up_call_only_reaches_by_default(tmp_path: Path, pty_pair: PtyPair):
    async with village(tmp_path, pty_pair, Phone(answer_after_s=0.3)) as (gw, sim, _caller):
        await wait_until(lambda: bool(sim.calls and sim.calls[0].ended_by), timeout=15,
                         what="the call to end")  # fmt: skip
        rows = await _rows(gw, 3)
        await asyncio.sleep(0.3)  # time for a wrong NotifyFailed to be committed
        case = gw.desk.cases[CASE]
    assert rows[2] == ("a", "voice", "reached"), rows
    # Reached is not accepted: the desk still waits for a's answer by SMS.
    assert case.state.value == "notifying"
    assert case.current == "a"
    assert _journal(tmp_path / "gateway.db") == []


async def test_picked_up_call_accepts_where_the_village_says_so(tmp_path: Path, pty_pair: PtyPair):
    phone = Phone(answer_after_s=0.3)
    extra = "answered_call_accepts = true\n"
    async with village(tmp_path, pty_pair, phone, extra) as (gw, _sim, _caller):
        await wait_until(lambda: gw.desk.cases[CASE].state.value == "accepted", timeout=15,
                         what="the case to be accepted")  # fmt: skip
        case = gw.desk.cases[CASE]
        rows = await _rows(gw, 3)
    assert case.accepted_by == "a"
    assert ("a", "voice", "accepted") in rows, rows
