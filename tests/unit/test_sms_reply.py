"""Replies by SMS: what a person's text means, and the PDUs that carry it.

The PDU round trips pair the gateway's codec with the simulator's, which is
written separately, plus vectors worked out by hand from 3GPP TS 23.040, so a
mistake shared by both ends still shows.
"""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.notify.modem import (
    decode_sms_deliver,
    encode_sms_submit,
    parse_reply,
    split_ucs2,
)
from simulators.modem import GSM_BASIC, decode_submit, encode_deliver


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # digits, the menu in the message
        ("1", ("accept", None)),
        ("2", ("decline", None)),
        ("3", ("arrived", None)),
        ("4", ("resolved", None)),
        ("１", ("accept", None)),  # full-width, as Chinese keyboards type it
        (" 4。", ("resolved", None)),
        # with a case code, before or after, with or without '#'
        ("1 1017-5", ("accept", "1017-5")),
        ("1017-5 3", ("arrived", "1017-5")),
        ("#1017-5 2", ("decline", "1017-5")),
        ("4#1017-5", ("resolved", "1017-5")),
        ("＃１０１７－５　１", ("accept", "1017-5")),
        ("接单 1017-5", ("accept", "1017-5")),
        # accept
        ("收到", ("accept", None)),
        ("接单", ("accept", None)),
        ("好", ("accept", None)),
        ("好的", ("accept", None)),
        ("马上到", ("accept", None)),
        ("快到了", ("accept", None)),
        ("没问题", ("accept", None)),
        ("OK", ("accept", None)),
        ("不好意思，马上到", ("accept", None)),
        # "好了" is "done" or "alright": the safe reading is accept
        ("好了", ("accept", None)),
        # decline
        ("不行", ("decline", None)),
        ("拒绝", ("decline", None)),
        ("没空", ("decline", None)),
        ("不接", ("decline", None)),
        ("今天去不了", ("decline", None)),
        ("1 不行", ("decline", None)),  # a no never turns into a yes
        ("2 好", ("decline", None)),
        # arrived
        ("到了", ("arrived", None)),
        ("已到", ("arrived", None)),
        ("到达", ("arrived", None)),
        ("收到，已到", ("arrived", None)),
        ("到", ("arrived", None)),
        # resolved
        ("办结", ("resolved", None)),
        ("完成", ("resolved", None)),
        ("已解决", ("resolved", None)),
        ("已到，办结", ("resolved", None)),
        # not understood: better ignored than guessed
        ("还没到", None),
        ("未完成", None),
        ("解决不了", None),
        ("不可以", None),
        ("3点到", None),  # "coming at three", not menu item 3
        ("1 2", None),
        ("13800000001", None),
        ("1017-5", None),
        ("谁啊？", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_reply(text: str, expected: tuple[str, str | None] | None):
    assert parse_reply(text) == expected


@given(st.text(max_size=200))
def test_parse_reply_never_raises(text: str):
    result = parse_reply(text)
    assert result is None or result[0] in ("accept", "decline", "arrived", "resolved")


# -- PDUs --------------------------------------------------------------------


def test_submit_pdu_vector():
    # Worked by hand: SCA 00, SMS-SUBMIT 11, MR 00, 11 digits national 81
    # 3108000000F1, PID 00, DCS 08 (UCS2), VP A7 (24 h), UDL 04, 你好 = 4F60 597D.
    assert encode_sms_submit("13800000001", "你好") == [
        ("0011000B813108000000F10008A7044F60597D", 18)
    ]


def test_submit_international_number():
    ((pdu, _length),) = encode_sms_submit("+8613800000001", "A")
    assert pdu.startswith("0011000D91683108000000F1")


def test_deliver_gsm7_vector():
    # The classic example from the GSM 03.40 tutorials: "hellohello".
    sms = decode_sms_deliver(
        "07917283010010F5040BC87238880900F10000993092516195800AE8329BFD4697D9EC37"
    )
    assert sms.sender == "27838890001"
    assert sms.text == "hellohello"
    assert sms.timestamp == calendar.timegm((1999, 3, 29, 15, 16, 59)) - 2 * 3600


def test_deliver_rejects_status_reports_and_junk():
    with pytest.raises(ValueError, match="SMS-DELIVER"):
        decode_sms_deliver("0006D60B911326880736F4111011719551401110117195714000")
    with pytest.raises(ValueError, match="hex"):
        decode_sms_deliver("not hex")
    with pytest.raises(ValueError, match="truncated"):
        decode_sms_deliver("00040B91")


def test_split_counts_utf16_units_and_keeps_emoji_whole():
    assert split_ucs2("字" * 70) == ["字" * 70]
    assert [len(p) for p in split_ucs2("字" * 71)] == [67, 4]
    parts = split_ucs2("😀" * 40)  # 80 units: two parts, no half emoji
    assert [len(p.encode("utf-16-be")) // 2 for p in parts] == [66, 14]
    assert "".join(parts) == "😀" * 40


numbers = st.from_regex(r"\+?[0-9]{3,15}", fullmatch=True)


@settings(max_examples=200)
@given(numbers, st.text(max_size=400), st.integers(0, 255))
def test_submit_round_trip(number: str, text: str, ref: int):
    parts = [decode_submit(pdu, n) for pdu, n in encode_sms_submit(number, text, ref)]
    assert "".join(p.text for p in parts) == text
    assert {p.number for p in parts} == {number}
    assert all(p.units <= (70 if len(parts) == 1 else 67) for p in parts)
    assert [p.seq for p in parts] == list(range(1, len(parts) + 1))


@settings(max_examples=200)
@given(
    numbers,
    st.one_of(st.text(max_size=400), st.text(alphabet=GSM_BASIC.replace("\x1b", ""))),
)
def test_deliver_round_trip(sender: str, text: str):
    decoded = [decode_sms_deliver(pdu) for pdu in encode_deliver(sender, text, 1.7e9, 9)]
    if len(decoded) > 1:
        assert all(d.concat is not None and d.concat[:2] == (9, len(decoded)) for d in decoded)
    assert "".join(d.text for d in decoded) == text
    assert {d.sender for d in decoded} == {sender}
    assert decoded[0].timestamp == 1.7e9 // 1
