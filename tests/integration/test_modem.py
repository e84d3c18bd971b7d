"""The modem driver against the simulated module over real pseudo-terminals.

The driver opens the socat pair's gateway end with pyserial, exactly as it
would open /dev/ttyUSB2; the simulator sits on the device end in the same
event loop.  Timings are shortened (half-second command timeouts, health
checks several times a second) so faults are noticed quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import Metrics
from gateway.notify import ChannelError, Delivery, Outgoing
from gateway.notify.modem import (
    CallResult,
    Modem,
    SmsChannel,
    VoiceChannel,
    parse_reply,
    reset_command,
)
from simulators.modem import ModemSim, Phone, Scenario

from ..conftest import PtyPair
from .helpers import wait_until

ALICE = "13800000001"  # answers after half a second and presses 1
BOB = "13800000002"  # busy
CAROL = "13800000003"  # never answers
DAVE = "13800000004"  # rejects: "connected", then hangs up at once
ERIN = "13800000005"  # answers, presses nothing
FAY = "13800000006"  # the network refuses SMS to her

PHONES = {
    ALICE: Phone(answer_after_s=0.4, dtmf="1", dtmf_after_s=0.3, reply="1 收到", reply_after_s=0.2),
    BOB: Phone(busy=True),
    CAROL: Phone(),
    DAVE: Phone(reject=True, reject_quirk=True, reject_after_s=0.3, reject_connected_s=0.4),
    ERIN: Phone(answer_after_s=0.3),
    FAY: Phone(sms_error=500),
}

FAST: dict[str, Any] = {
    "command_timeout_s": 0.5,
    "health_interval_s": 0.25,
    "hang_after": 2,
    "reopen_min_s": 0.05,
    "reopen_max_s": 0.3,
    "sim_retry_s": 0.1,
    "sim_ready_timeout_s": 10.0,
    "poll_interval_s": 0.2,
    "min_connected_s": 1.0,
    "answer_window_s": 3.0,
    "reset_boot_s": 0.3,
}


def scenario(**changes: Any) -> Scenario:
    return Scenario(phones=dict(PHONES), **changes)


@contextlib.asynccontextmanager
async def rig(
    pty_pair: PtyPair, sc: Scenario | None = None, *, wait_ready: bool = True, **kwargs: Any
) -> AsyncIterator[tuple[Modem, ModemSim]]:
    sim = ModemSim(pty_pair.device_port, sc or scenario())
    await sim.start()
    modem = Modem(str(pty_pair.gateway_port), metrics=Metrics(), **{**FAST, **kwargs})
    task = asyncio.create_task(modem.run())
    try:
        if wait_ready:
            await wait_until(lambda: modem.ready, timeout=10, what="the modem to become ready")
        yield modem, sim
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sim.stop()


async def timed(coro: Any) -> tuple[Any, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await coro
    return result, loop.time() - start


# -- start-up ---------------------------------------------------------------


async def test_initialises_and_reports_ready(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        assert modem.registered
        assert modem.signal_csq == 23
        assert modem.last_error is None
        assert modem.dtmf_supported
        for command in ("ATE0", "AT+CMEE=2", "AT+CPIN?", "AT+CMGF=0", "AT+CNMI=2,1,0,0,0",
                        "AT+CLIP=1", "AT+CSQ", "AT+QTONEDET=1"):  # fmt: skip
            assert command in sim.commands
        assert modem.metrics.get("gateway_modem_ready", modem="modem") == 1


async def test_sim_busy_after_power_up_is_retried(pty_pair: PtyPair):
    async with rig(pty_pair, scenario(sim_busy_s=1.0)) as (modem, sim):
        assert sim.commands.count("AT+CPIN?") >= 2
        assert modem.ready
        assert modem.registered


async def test_no_sim_is_reported_and_never_ready(pty_pair: PtyPair):
    async with rig(pty_pair, scenario(sim="absent"), wait_ready=False) as (modem, _sim):
        await wait_until(
            lambda: modem.metrics.get("gateway_modem_no_sim_total") >= 1, what="the SIM check"
        )
        assert not modem.ready
        assert "no SIM" in (modem.last_error or "")
        with pytest.raises(ChannelError, match="not ready"):
            await modem.send_sms(ALICE, "你好")


async def test_no_signal_refuses_at_once(pty_pair: PtyPair):
    async with rig(pty_pair, scenario(registered=False)) as (modem, sim):
        assert not modem.registered
        assert modem.signal_csq is None
        start = asyncio.get_running_loop().time()
        with pytest.raises(ChannelError, match="not registered"):
            await modem.send_sms(ALICE, "你好")
        assert asyncio.get_running_loop().time() - start < 0.5
        with pytest.raises(ChannelError):
            await modem.ring(ALICE, ring_s=5, accept_digit="1")
        assert not any(c.startswith(("AT+CMGS", "ATD")) for c in sim.commands)
        # The network comes back: the +CREG URC makes the modem usable again.
        sim.set_network(registered=True)
        await wait_until(lambda: modem.registered and modem.signal_csq, what="registration")
        await modem.send_sms(ALICE, "你好")
        assert sim.sms_sent[-1].text == "你好"


# -- SMS out ----------------------------------------------------------------


async def test_chinese_sms_arrives_intact(pty_pair: PtyPair):
    text = "【一键呼叫】张桂兰（叶集区三元村3组12号，独居）按了呼叫键，请回复“接单”。😀"
    async with rig(pty_pair) as (modem, sim):
        await modem.send_sms(ALICE, text)
    assert [(s.number, s.text, s.parts) for s in sim.sms_sent] == [(ALICE, text, 1)]


async def test_long_sms_is_split_into_linked_parts(pty_pair: PtyPair):
    text = "".join(f"第{i}句：请到三元村三组看望独居老人。" for i in range(1, 11))
    assert len(text) > 140
    async with rig(pty_pair) as (modem, sim):
        await modem.send_sms("+8613800000001", text)
    (sms,) = sim.sms_sent
    assert sms.number == "+8613800000001"
    assert sms.text == text
    assert sms.parts == 3
    assert sms.part_lengths[:-1] == [67, 67]
    assert len({p.ref for p in sim.sms_parts}) == 1  # one concatenation reference


async def test_sms_refused_by_network_raises(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        with pytest.raises(ChannelError, match="CMS ERROR"):
            await modem.send_sms(FAY, "你好")
        assert modem.ready  # a refused message is not a sick modem
        await modem.send_sms(ALICE, "还在")
        assert [s.text for s in sim.sms_sent] == ["还在"]


async def test_sms_channel_renders_template(pty_pair: PtyPair):
    message = Outgoing(
        "p1", "王书记", ALICE, None, "1017-5", "call", "【一键呼叫】张大爷按了呼叫键。"
    )
    async with rig(pty_pair) as (modem, sim):
        channel = SmsChannel(modem, details=lambda m: {"resident": "张大爷"})
        await channel.send(message)
    text = sim.sms_sent[0].text
    assert text.startswith("【一键呼叫】张大爷按了呼叫键。")
    assert "1017-5" in text
    assert "1接单" in text


# -- calls ------------------------------------------------------------------


async def test_ring_answered_with_accept_digit(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        outcome = await modem.ring(ALICE, ring_s=5, accept_digit="1")
        assert not modem.in_call
    assert outcome.result is CallResult.ANSWERED
    assert outcome.digits == "1"
    assert outcome.accepted
    assert sim.calls[0].ended_by == "gateway"  # we hung up once the key came


async def test_ring_answered_without_dtmf_support(pty_pair: PtyPair):
    async with rig(pty_pair, scenario(dtmf=None)) as (modem, sim):
        assert not modem.dtmf_supported
        outcome = await modem.ring(ERIN, ring_s=5, accept_digit="1")
    assert outcome.result is CallResult.ANSWERED  # "reached": acceptance comes another way
    assert not outcome.accepted
    assert outcome.connected_s >= 1.0
    assert sim.calls[0].ended_by == "gateway"


async def test_ring_busy(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, _sim):
        outcome, took = await timed(modem.ring(BOB, ring_s=10, accept_digit="1"))
    assert outcome.result is CallResult.BUSY
    assert took < 5


async def test_ring_no_answer_hangs_up_after_ring_time(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        outcome, took = await timed(modem.ring(CAROL, ring_s=1.5, accept_digit="1"))
    assert outcome.result is CallResult.NO_ANSWER
    assert 1.4 < took < 6
    assert sim.calls[0].ended_by == "gateway"


async def test_rejected_call_that_reports_connected_is_not_answered(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, _sim):
        outcome = await modem.ring(DAVE, ring_s=5, accept_digit="1")
    assert outcome.result is CallResult.REJECTED
    assert not outcome.answered
    assert not outcome.accepted


SIMCOM = {"dtmf": "simcom", "clcc_urc": True, "model": "SIM7600"}


@pytest.mark.parametrize(
    ("number", "result"),
    [(ALICE, CallResult.ANSWERED), (BOB, CallResult.BUSY), (DAVE, CallResult.REJECTED)],
)
async def test_simcom_style_urcs(pty_pair: PtyPair, number: str, result: CallResult):
    """SIMCom reports call states as +CLCC URCs and DTMF as +RXDTMF."""
    async with rig(pty_pair, scenario(**SIMCOM)) as (modem, sim):
        assert "AT+DDET=1" in sim.commands
        outcome = await modem.ring(number, ring_s=5, accept_digit="1")
    assert outcome.result is result
    assert outcome.accepted == (number == ALICE)


async def test_voice_channel_reports_outcome_and_refuses_when_busy(pty_pair: PtyPair):
    outcomes: list[Any] = []
    message = Outgoing("p1", "王书记", ALICE, None, "1017-5", "call", "呼叫")
    async with rig(pty_pair) as (modem, _sim):
        channel = VoiceChannel(
            modem, ring_s=5, on_outcome=lambda m, o, d: outcomes.append((m, o, d))
        )
        call = await channel.send(message)
        assert modem.in_call
        # One line, one call: the next person falls through to another channel.
        with pytest.raises(ChannelError, match="another call"):
            await channel.send(message)
        with pytest.raises(ChannelError, match="calls only"):
            await channel.send(Outgoing("p1", "王书记", ALICE, None, "1017-5", "taken", "已接"))
        delivery = await asyncio.wait_for(call, 10)
    assert outcomes[0][1].accepted
    assert outcomes[0][2] == delivery
    assert delivery == Delivery("accepted", True, True, "pressed 1 during the call")


@pytest.mark.parametrize("answered_call_accepts", [False, True])
async def test_picked_up_call_without_the_key(pty_pair: PtyPair, answered_call_accepts: bool):
    """Answered is not accepted, unless the village decided that it is."""
    message = Outgoing("p1", "王书记", ERIN, None, "1017-5", "call", "呼叫")
    async with rig(pty_pair, scenario(dtmf=None)) as (modem, _sim):
        channel = VoiceChannel(modem, ring_s=5, answered_call_accepts=answered_call_accepts)
        delivery = await asyncio.wait_for(await channel.send(message), 10)
    assert delivery.reached
    assert delivery.accepted is answered_call_accepts
    assert delivery.outcome == ("accepted" if answered_call_accepts else "reached")


@pytest.mark.parametrize(
    ("number", "outcome"),
    [(BOB, "busy"), (CAROL, "no_answer"), (DAVE, "rejected")],
)
async def test_unanswered_calls_are_not_reached(pty_pair: PtyPair, number: str, outcome: str):
    message = Outgoing("p1", "王书记", number, None, "1017-5", "call", "呼叫")
    async with rig(pty_pair) as (modem, _sim):
        channel = VoiceChannel(modem, ring_s=1.5, answered_call_accepts=True)
        delivery = await asyncio.wait_for(await channel.send(message), 10)
    assert (delivery.outcome, delivery.reached, delivery.accepted) == (outcome, False, False)


async def test_incoming_call_is_rejected(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        sim.ring_in(ALICE)
        await wait_until(lambda: sim.incoming_rejected == [ALICE], what="the rejection")
        assert modem.metrics.get("gateway_modem_incoming_calls_total") == 1
        assert modem.ready


async def test_sms_in_flight_fails_fast_when_port_is_lost(pty_pair: PtyPair):
    async with rig(pty_pair, sms_timeout_s=30.0) as (modem, sim):
        sim.hang()  # the prompt never comes ...
        sending = asyncio.create_task(modem.send_sms(ALICE, "你好"))
        await asyncio.sleep(0.3)
        pty_pair.stop()  # ... and then the module is gone
        with pytest.raises(ChannelError, match="session ended"):
            await asyncio.wait_for(sending, 5)
        pty_pair.start()


# -- SMS in -----------------------------------------------------------------


async def test_sms_reply_reaches_on_sms(pty_pair: PtyPair):
    got: list[tuple[str, str, float]] = []
    async with rig(pty_pair, on_sms=lambda s, t, at: got.append((s, t, at))) as (modem, sim):
        await modem.send_sms(ALICE, "【一键呼叫】请回复")
        await wait_until(lambda: got, what="the reply")
        await wait_until(lambda: not sim._storage, what="the reply to be deleted")
    ((sender, text, at),) = got
    assert (sender, text) == (ALICE, "1 收到")
    assert at > 1.6e9
    assert parse_reply(text) == ("accept", None)


async def test_messages_stored_while_away_are_read_at_start(pty_pair: PtyPair):
    long_reply = "已到达现场，" + "老人情况稳定，" * 15 + "办结。"
    inbox = [{"sender": BOB, "text": "到了 1017-5"}, {"sender": CAROL, "text": long_reply}]
    got: list[tuple[str, str]] = []

    async def on_sms(sender: str, text: str, at: float) -> None:
        await asyncio.sleep(0)
        got.append((sender, text))

    async with rig(pty_pair, scenario(inbox=inbox), on_sms=on_sms) as (_modem, sim):
        await wait_until(lambda: len(got) == 2, what="stored messages")
        await wait_until(lambda: not sim._storage, what="stored messages to be deleted")
    assert got == [(BOB, "到了 1017-5"), (CAROL, long_reply)]


async def test_failing_sms_handler_does_not_stop_reading(pty_pair: PtyPair):
    got: list[str] = []

    def on_sms(sender: str, text: str, at: float) -> None:
        if text == "boom":
            raise RuntimeError("handler bug")
        got.append(text)

    async with rig(pty_pair, on_sms=on_sms) as (modem, sim):
        sim.deliver_sms(BOB, "boom")
        sim.deliver_sms(BOB, "2")
        await wait_until(lambda: got == ["2"], what="the second message")
        assert modem.metrics.get("gateway_modem_on_sms_errors_total") == 1
        assert modem.ready


# -- faults -----------------------------------------------------------------


async def test_garbage_and_split_replies_are_survived(pty_pair: PtyPair):
    got: list[str] = []
    sc = scenario(garbage_every_s=0.05, split_writes=True)
    async with rig(pty_pair, sc, on_sms=lambda s, t, at: got.append(t)) as (modem, sim):
        sim.garbage(b"\xff\xfe\x00OK\x80")
        await modem.send_sms(ALICE, "噪声中的短信")
        outcome = await modem.ring(BOB, ring_s=5)
        await wait_until(lambda: got, what="the reply through the noise")
        assert modem.metrics.get("gateway_modem_garbage_lines_total") > 0
        assert modem.metrics.get("gateway_modem_hangs_total") == 0
    assert sim.sms_sent[0].text == "噪声中的短信"
    assert outcome.result is CallResult.BUSY
    assert got == ["1 收到"]


async def test_hung_module_is_noticed_and_reinitialised(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        inits = sim.commands.count("ATE0")
        sim.hang()  # stops answering, for good
        await wait_until(lambda: not modem.ready, timeout=5, what="the hang to be noticed")
        assert modem.metrics.get("gateway_modem_hangs_total") >= 1
        with pytest.raises(ChannelError, match="not ready"):
            await modem.send_sms(ALICE, "你好")
        await asyncio.sleep(0.5)
        sim.unhang()
        await wait_until(lambda: modem.ready, timeout=10, what="reinitialisation")
        assert sim.commands.count("ATE0") > inits
        await modem.send_sms(ALICE, "恢复了")
    assert sim.sms_sent[-1].text == "恢复了"


async def test_hung_module_is_reset_by_the_hook(pty_pair: PtyPair):
    resets: list[float] = []
    sim_ref: list[ModemSim] = []

    async def reset() -> None:
        resets.append(asyncio.get_running_loop().time())
        sim_ref[0].restart()  # what toggling the module's RESET_N pin does

    async with rig(pty_pair, reset=reset) as (modem, sim):
        sim_ref.append(sim)
        sim.hang(cleared_by="power")  # AT+CFUN=1,1 does not get through
        await wait_until(lambda: resets, timeout=10, what="the reset hook")
        await wait_until(lambda: modem.ready, timeout=10, what="the module after reset")
        await modem.send_sms(ALICE, "重启后")
        # Reopened first, then AT+CFUN=1,1 (which this hang ignores), then the hook.
        assert modem.metrics.get("gateway_modem_resets_total", modem="modem", how="at") == 1
        assert modem.metrics.get("gateway_modem_resets_total", modem="modem", how="command") == 1
        assert sim.reboots == ["power"]
    assert sim.sms_sent[-1].text == "重启后"


async def test_hung_module_is_woken_by_cfun_after_a_reopen_fails(pty_pair: PtyPair):
    """Hang; the reopen does not help; AT+CFUN=1,1 reboots it; SIM busy for a
    while after the boot; then ready, and the SMS goes out."""
    async with rig(pty_pair, scenario(sim_busy_s=0.8)) as (modem, sim):
        await asyncio.sleep(0.8)  # past the SIM-busy time of the first boot
        sim.commands.clear()
        sim.hang(cleared_by="cfun")
        await wait_until(lambda: not modem.ready, timeout=5, what="the hang to be noticed")
        await wait_until(lambda: sim.reboots, timeout=10, what="the module to be reset")
        # The reset came only after a reopen found the module still silent.
        assert modem.metrics.get("gateway_modem_sessions_total") >= 2
        before_reset = sim.commands[: sim.commands.index("AT+CFUN=1,1")]
        assert before_reset.count("AT") >= 2  # the reopened session's probes
        assert sim.reboots == ["cfun"]
        await wait_until(lambda: modem.ready, timeout=10, what="the module after the reset")
        after_reset = sim.commands[sim.commands.index("AT+CFUN=1,1") :]
        assert after_reset.count("AT+CPIN?") >= 2  # SIM busy after the boot, retried
        assert modem.metrics.get("gateway_modem_resets_total", modem="modem", how="at") == 1
        await modem.send_sms(ALICE, "重启后")
    assert sim.sms_sent[-1].text == "重启后"


async def test_reset_is_off_when_the_village_says_so(pty_pair: PtyPair):
    async with rig(pty_pair, soft_reset=False) as (modem, sim):
        sim.hang(cleared_by="cfun")
        await wait_until(
            lambda: modem.metrics.get("gateway_modem_sessions_total") >= 4,
            timeout=15,
            what="several reopens",
        )
        assert "AT+CFUN=1,1" not in sim.commands
        assert modem.metrics.get("gateway_modem_resets_total") == 0
        assert not modem.ready


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "modem-reset.py"
    path.write_text(body)
    return [sys.executable, str(path)]


async def test_reset_command_pulls_the_reset_pin(pty_pair: PtyPair, tmp_path: Path):
    """The village's reset program (here: touching the simulator's RESET_N file)."""
    pin = tmp_path / "reset-pin"
    hook = reset_command(
        _script(tmp_path, f"import pathlib; pathlib.Path({str(pin)!r}).touch()\n"), timeout_s=10
    )
    sc = scenario(reset_file=str(pin))
    async with rig(pty_pair, sc, soft_reset=False, reset=hook) as (modem, sim):
        sim.hang(cleared_by="power")
        await wait_until(lambda: sim.reboots, timeout=10, what="the reset command")
        assert sim.reboots == ["reset_pin"]
        await wait_until(lambda: modem.ready, timeout=10, what="the module after reset")
        await modem.send_sms(ALICE, "重启后")
        assert modem.metrics.get("gateway_modem_resets_total", modem="modem", how="command") == 1
        assert modem.metrics.get("gateway_modem_reset_failures_total") == 0
    assert sim.sms_sent[-1].text == "重启后"


async def test_failing_reset_command_is_logged_counted_and_survived(
    pty_pair: PtyPair, tmp_path: Path
):
    hook = reset_command(_script(tmp_path, "import sys; sys.exit('no GPIO here')\n"))
    async with rig(pty_pair, soft_reset=False, reset=hook) as (modem, sim):
        sim.hang(cleared_by="power")
        await wait_until(
            lambda: modem.metrics.get("gateway_modem_reset_failures_total") >= 1,
            timeout=10,
            what="the failed reset",
        )
        sim.unhang()  # the driver carries on reopening
        await wait_until(lambda: modem.ready, timeout=10, what="ready again")


async def test_reset_command_errors_say_why(tmp_path: Path):
    with pytest.raises(Exception, match="exit status 3: stuck"):
        await reset_command(
            _script(tmp_path, "import sys; sys.stderr.write('stuck'); sys.exit(3)\n")
        )()
    with pytest.raises(Exception, match="killed"):
        await reset_command(_script(tmp_path, "import time; time.sleep(30)\n"), timeout_s=0.3)()
    with pytest.raises(Exception, match="cannot start"):
        await reset_command([str(tmp_path / "missing")])()


async def test_module_restarting_by_itself_is_reinitialised(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        inits = sim.commands.count("ATE0")
        sim.restart()  # brown-out: settings gone, echo back on, RDY
        await wait_until(lambda: sim.commands.count("ATE0") > inits, what="reinitialisation")
        await wait_until(lambda: modem.ready, timeout=10, what="ready again")
        await modem.send_sms(ALICE, "你好")
    assert sim.sms_sent[-1].text == "你好"


async def test_port_vanishes_and_returns(pty_pair: PtyPair):
    async with rig(pty_pair) as (modem, sim):
        pty_pair.stop()  # the USB modem is pulled out
        await wait_until(lambda: not modem.ready, timeout=5, what="the loss to be noticed")
        with pytest.raises(ChannelError):
            await modem.send_sms(ALICE, "你好")
        pty_pair.start()  # ... and plugged back in
        await wait_until(lambda: modem.ready, timeout=10, what="the modem to come back")
        await modem.send_sms(ALICE, "回来了")
        assert modem.metrics.get("gateway_modem_sessions_total") >= 2
    assert sim.sms_sent[-1].text == "回来了"


async def test_simulator_runs_on_its_own_pty(tmp_path):
    """``--link`` mode: the simulator makes the pty; no socat needed."""
    link = tmp_path / "ttyMODEM"
    async with ModemSim(None, scenario(), link=link) as sim:
        modem = Modem(str(link), metrics=Metrics(), **FAST)
        task = asyncio.create_task(modem.run())
        try:
            await wait_until(lambda: modem.ready, timeout=10, what="ready")
            outcome = await modem.ring(DAVE, ring_s=5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert outcome.result is CallResult.REJECTED
    assert sim.calls[0].number == DAVE
