"""Issue 4 end to end, with the daemon, a modem simulator and a caller:

green press; the first person's phone rings and gets a text and nobody answers;
once the phone has rung out (before the step's timeout) the call goes to the
second person, who accepts by SMS reply; the caller shows "help is coming"; the
second person resolves it from the app; the resident presses thumbs up; the
case holds the whole story in order, the unanswered call included.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiomqtt
import pytest

from firmware_protocol import CallerState, Key
from gateway.notify.app import sign_answer
from simulators.caller import CounterFile, SerialBus, SimCaller

from ..conftest import REPO, Broker, PtyPair, require_binary, write_config
from ..integration.helpers import caller_key
from .conftest import Daemon
from .village_short import use_village

pytestmark = pytest.mark.e2e

A_PHONE, B_PHONE = "13900000001", "13900000002"
B_KEY = "00112233445566778899aabbccddeeff"

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
app_id = "app-b"
app_key = "{B_KEY}"
channels = ["sms", "app"]

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
ack_timeout_s = 10
[[escalation.step]]
person = "b"
ack_timeout_s = 60
"""

DEV = 1020


async def test_ring_escalate_sms_accept_app_resolve_thumbs_up(
    tmp_path, pty_pair: PtyPair, broker: Broker, daemon_factory
):
    from ..conftest import PtyPair as Pair

    modem_pair = Pair(require_binary("socat", "socat"), tmp_path / "ttyMODEM",
                      tmp_path / "ttyMODEMSIM")
    modem_pair.start()
    sim = subprocess.Popen(  # noqa: ASYNC220 -- started once, read after the test
        [sys.executable, "-m", "simulators.modem", "--port", str(modem_pair.device_port),
         "--never", A_PHONE, "--reply", f"{B_PHONE}:1:1 收到"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        cfg = write_config(tmp_path, serial_port=pty_pair.gateway_port, mqtt_port=broker.port,
                           village="loop4")
        use_village(cfg, PEOPLE, ROSTER)
        with cfg.open("a") as fh:
            fh.write(f'\n[modem]\nport = "{modem_pair.gateway_port}"\nring_s = 5\n')

        daemon = Daemon(cfg)
        daemon_factory.append(daemon)
        await asyncio.to_thread(daemon.wait_for, "gateway ready")
        # The gateway does not wait for the modem to be ready; the press must,
        # or a's call and text fail at once and the story is another one.
        await asyncio.to_thread(daemon.wait_for, "modem ready")

        states: list[CallerState] = []
        bus = SerialBus(str(pty_pair.device_port))
        caller = SimCaller(DEV, caller_key(DEV), CounterFile(tmp_path / "c.json"), bus.send,
                           on_feedback=lambda c, fb: states.append(fb.state))
        bus.callers[DEV] = caller
        async with bus:
            assert (await caller.press(Key.CALL, give_up_s=10)).acked
            deadline = time.monotonic() + 40
            while CallerState.HELP_COMING not in states:
                assert time.monotonic() < deadline, f"no HELP_COMING; caller saw {states}"
                await asyncio.sleep(0.1)
            # b resolves it from the app.
            fields: dict[str, object] = {
                "v": 1, "app_id": "app-b", "person_id": "b", "case_id": f"{DEV}-1",
                "answer": "resolved", "note": "送去镇卫生院了", "sent_at": time.time(),
                "seq": 1,
            }
            fields["mac"] = sign_answer(bytes.fromhex(B_KEY), fields)
            async with aiomqtt.Client("127.0.0.1", broker.port) as app:
                await app.publish("onetouch/loop4/app/app-b/answer",
                                  json.dumps(fields).encode(), qos=1)
            deadline = time.monotonic() + 15
            while CallerState.IDLE not in states[states.index(CallerState.HELP_COMING):]:
                assert time.monotonic() < deadline, f"not resolved; caller saw {states}"
                await asyncio.sleep(0.1)
            assert (await caller.press(Key.UP, give_up_s=10)).acked
            deadline = time.monotonic() + 10
            while CallerState.THANKS not in states:
                assert time.monotonic() < deadline, f"no thanks; caller saw {states}"
                await asyncio.sleep(0.1)
        story = subprocess.run(  # noqa: ASYNC221 -- the CLI, once, nothing else runs
            [sys.executable, "-m", "gateway", "cases", "--case", f"{DEV}-1", "--json",
             "--config", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert daemon.stop() == 0
    finally:
        sim.terminate()
        sim_out, _ = sim.communicate(timeout=10)
        modem_pair.stop()

    assert story.returncode == 0, story.stderr
    data = json.loads(story.stdout)
    assert data["state"] == "resolved"
    assert data["ratings"] == ["up"]
    steps = [(s["what"], s["why"]) for s in data["story"]]
    whats = [w for w, _ in steps]
    # In order: opened and a called (rung and texted), a's phone rang out, the
    # desk moved on at once, then b texted, b accepts by SMS, b resolves from
    # the app, the rating.
    order = [
        next(i for i, w in enumerate(whats) if w.endswith("-> opened")),
        steps.index(("call to 甲书记 by voice", "sent")),
        next(i for i, w in enumerate(whats) if w == "call to 甲书记 by sms"),
        steps.index(("call to 甲书记 by voice", "no_answer")),
        steps.index(("notifying -> notifying", "unreachable")),
        next(i for i, w in enumerate(whats) if w == "call to 乙副书记 by sms"),
        next(i for i, w in enumerate(whats) if w.endswith("-> accepted")),
        next(i for i, w in enumerate(whats) if w.endswith("-> resolved")),
    ]
    assert order == sorted(order), steps
    assert any("rat" in why for _w, why in steps), steps
    unreachable = data["story"][steps.index(("notifying -> notifying", "unreachable"))]
    assert "甲书记 via voice: no_answer" in unreachable["detail"], unreachable
    # The modem really rang a and texted both.
    records = [json.loads(line) for line in sim_out.splitlines() if line.startswith("{")]
    assert any(r.get("number") == A_PHONE and "call" in json.dumps(r) for r in records), records
    assert any(r.get("number") == B_PHONE for r in records), records
