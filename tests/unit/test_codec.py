"""The wire codec: round trips, resynchronisation, rejections, MACs and replay checks."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import firmware_protocol as fp
from firmware_protocol import Reason, Verdict

KEY = bytes(range(16))
OTHER_KEY = bytes(range(16, 32))

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------

u32 = st.integers(0, fp.MAX_COUNTER)
device_ids = u32
counters = st.integers(1, fp.MAX_COUNTER)
keys = st.binary(min_size=fp.KEY_LEN, max_size=fp.KEY_LEN)

key_presses = st.builds(fp.KeyPress, st.sampled_from(fp.Key))
heartbeats = st.builds(
    fp.Heartbeat,
    battery_mv=st.integers(0, 0xFFFF),
    battery_pct=st.none() | st.integers(0, 100),
    signal_dbm=st.none() | st.integers(-127, 127),
    external_power=st.booleans(),
    low_battery=st.booleans(),
)
acks = st.builds(fp.Ack, u32, st.sampled_from(fp.AckStatus))
caller_acks = st.builds(fp.CallerAck, u32)
feedbacks = st.builds(
    fp.Feedback,
    state=st.sampled_from(fp.CallerState),
    led_color=st.sampled_from(fp.LedColor),
    led_pattern=st.sampled_from(fp.LedPattern),
    buzzer=st.sampled_from(fp.Buzzer),
    hold_s=st.integers(0, 0xFFFF),
)
messages = st.one_of(key_presses, heartbeats, acks, caller_acks, feedbacks)


@st.composite
def frames(draw: st.DrawFn) -> tuple[fp.Message, int, int, bytes, bytes]:
    """(message, device id, counter, key, encoded frame)."""
    message = draw(messages)
    device_id = draw(device_ids)
    counter = draw(counters)
    key = draw(keys)
    return (
        message,
        device_id,
        counter,
        key,
        fp.encode(message, device_id=device_id, counter=counter, key=key),
    )


def encoded() -> st.SearchStrategy[bytes]:
    return frames().map(lambda f: f[4])


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into pieces of arbitrary sizes (including empty ones)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Noise, with sync patterns, headers and damaged frames mixed in to test resync."""
    pieces = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=40),
                st.just(fp.SYNC),
                st.just(fp.SYNC[:1]),
                st.binary(max_size=11).map(lambda b: fp.SYNC + b),  # a partial header
                encoded().flatmap(lambda f: st.integers(1, len(f) - 1).map(lambda n: f[:n])),
                encoded().flatmap(  # a whole frame with one byte changed
                    lambda f: st.tuples(st.integers(0, len(f) - 1), st.integers(1, 255)).map(
                        lambda p: f[: p[0]] + bytes([f[p[0]] ^ p[1]]) + f[p[0] + 1 :]
                    )
                ),
            ),
            max_size=4,
        )
    )
    return b"".join(pieces)


def build(
    *,
    version: int = fp.VERSION,
    type_code: int = fp.MsgType.KEY,
    device_id: int = 1001,
    counter: int = 1,
    payload: bytes = b"\x01",
    length: int | None = None,
    key: bytes = KEY,
) -> bytes:
    """A frame built by hand, with a correct MAC and CRC whatever its fields say."""
    body = struct.pack(
        ">BBIIB", version, type_code, device_id, counter, len(payload) if length is None else length
    )
    body += payload
    mac = hmac.digest(key, body, hashlib.sha256)[:8]
    return fp.SYNC + body + mac + fp.crc16(body + mac).to_bytes(2, "big")


def decode_all(*chunks: bytes) -> list[fp.Frame | fp.Rejected]:
    decoder = fp.FrameDecoder()
    out: list[fp.Frame | fp.Rejected] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.flush())
    return out


def merge_garbage(items: list[fp.Frame | fp.Rejected]) -> list[object]:
    out: list[object] = []
    for item in items:
        if isinstance(item, fp.Rejected) and item.reason is Reason.GARBAGE:
            if out and isinstance(out[-1], bytes):
                out[-1] += item.data
            else:
                out.append(item.data)
        else:
            out.append(item)
    return out


def only_frames(items: list[fp.Frame | fp.Rejected]) -> list[fp.Frame]:
    return [i for i in items if isinstance(i, fp.Frame)]


def is_subsequence(needles: list[bytes], haystack: list[bytes]) -> bool:
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


# --- round trips ------------------------------------------------------------


@FAST
@given(frames())
def test_round_trip(f: tuple[fp.Message, int, int, bytes, bytes]) -> None:
    message, device_id, counter, key, data = f
    assert len(data) == 23 + data[12]
    assert 24 <= len(data) <= fp.MAX_FRAME
    assert data[:2] == fp.SYNC
    assert data[2] == fp.VERSION
    frame = fp.decode_frame(data)
    assert isinstance(frame, fp.Frame), frame
    assert frame.message == message
    assert frame.type.uplink == isinstance(message, fp.KeyPress | fp.Heartbeat | fp.CallerAck)
    assert (frame.device_id, frame.counter, frame.raw) == (device_id, counter, data)
    assert fp.verify_mac(frame, key)
    assert frame.authenticated == data[2:-10]
    assert frame.mac == fp.compute_mac(key, frame.authenticated)
    assert fp.encode(frame.message, device_id=device_id, counter=counter, key=key) == data


@pytest.mark.parametrize(
    ("message", "type_code", "payload"),
    [
        (fp.KeyPress(fp.Key.CALL), 0x01, "01"),
        (fp.KeyPress(fp.Key.DOWN), 0x01, "04"),
        (fp.Heartbeat(3000, 87, -71, False, False), 0x02, "0bb857b900"),
        (fp.Heartbeat(4200, None, None, True, True), 0x02, "1068ff8003"),
        (fp.CallerAck(0x01020304), 0x03, "01020304"),
        (fp.Ack(7), 0x81, "0000000700"),
        (
            fp.Feedback(
                fp.CallerState.STILL_TRYING,
                fp.LedColor.AMBER,
                fp.LedPattern.FAST_BLINK,
                fp.Buzzer.LONG,
                0x1234,
            ),
            0x82,
            "060303031234",
        ),
    ],
)
def test_payload_layout(message: fp.Message, type_code: int, payload: str) -> None:
    data = fp.encode(message, device_id=0x01020304, counter=0x0A0B0C0D, key=KEY)
    assert data[3] == type_code
    assert data[4:8] == bytes.fromhex("01020304")
    assert data[8:12] == bytes.fromhex("0a0b0c0d")
    assert data[12] == len(payload) // 2
    assert data[13 : 13 + data[12]].hex() == payload
    assert data == build(
        type_code=type_code,
        device_id=0x01020304,
        counter=0x0A0B0C0D,
        payload=bytes.fromhex(payload),
    )


def test_encode_refuses_bad_fields() -> None:
    msg = fp.KeyPress(fp.Key.CALL)
    with pytest.raises(ValueError, match="counter"):
        fp.encode(msg, device_id=1, counter=0, key=KEY)
    with pytest.raises(ValueError, match="counter"):
        fp.encode(msg, device_id=1, counter=fp.MAX_COUNTER + 1, key=KEY)
    with pytest.raises(ValueError, match="device id"):
        fp.encode(msg, device_id=fp.MAX_COUNTER + 1, counter=1, key=KEY)
    with pytest.raises(ValueError, match="key"):
        fp.encode(msg, device_id=1, counter=1, key=KEY[:15])
    with pytest.raises(TypeError):
        fp.encode("call", device_id=1, counter=1, key=KEY)  # type: ignore[arg-type]


def test_direction_bit() -> None:
    assert {t for t in fp.MsgType if t.uplink} == {
        fp.MsgType.KEY,
        fp.MsgType.HEARTBEAT,
        fp.MsgType.CALLER_ACK,
    }
    assert all(bool(t & 0x80) != t.uplink for t in fp.MsgType)


# --- the stream decoder -----------------------------------------------------


@FAST
@given(st.binary(max_size=300).flatmap(lambda b: st.tuples(st.just(b), chunked(b))))
def test_decoder_never_raises(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    decoder = fp.FrameDecoder()
    items: list[fp.Frame | fp.Rejected] = []
    for chunk in chunks:
        items.extend(decoder.feed(chunk))
        # It never holds more than one incomplete frame.
        assert decoder.buffered < fp.MAX_FRAME
    items.extend(decoder.flush())
    assert decoder.buffered == 0
    assert all(isinstance(i, fp.Frame | fp.Rejected) for i in items)
    assert all(isinstance(i.reason, Reason) for i in items if isinstance(i, fp.Rejected))
    # Chunking changes only how skipped noise is split into reports.
    assert merge_garbage(items) == merge_garbage(decode_all(data))


@FAST
@given(
    st.lists(st.tuples(garbage(), encoded()), max_size=5).flatmap(
        lambda parts: st.tuples(st.just(parts), garbage())
    ),
    st.data(),
)
def test_frames_survive_garbage(
    case: tuple[list[tuple[bytes, bytes]], bytes], data: st.DataObject
) -> None:
    parts, tail = case
    stream = b"".join(noise + frame for noise, frame in parts) + tail
    # Trailing quiet bytes settle any false start at the end, as later traffic would.
    stream += bytes(fp.MAX_FRAME)
    chunks = data.draw(chunked(stream))
    got = [f.raw for f in only_frames(decode_all(*chunks))]
    assert is_subsequence([frame for _, frame in parts], got)


@FAST
@given(st.lists(encoded(), min_size=1, max_size=6), st.data())
def test_clean_stream_decodes_exactly(frames_: list[bytes], data: st.DataObject) -> None:
    chunks = data.draw(chunked(b"".join(frames_)))
    items = decode_all(*chunks)
    assert [i.raw for i in items if isinstance(i, fp.Frame)] == frames_
    assert len(items) == len(frames_)


def test_frame_inside_damaged_frame_is_found() -> None:
    good = fp.encode(fp.KeyPress(fp.Key.CALL), device_id=5, counter=9, key=KEY)
    cut = fp.encode(fp.Heartbeat(3300, 90, None, True, False), device_id=5, counter=8, key=KEY)
    items = decode_all(cut[:20] + good)
    assert next(i.reason for i in items if isinstance(i, fp.Rejected)) is Reason.BAD_CRC
    assert [f.raw for f in only_frames(items)] == [good]


# --- rejections ---------------------------------------------------------------


def reasons(data: bytes) -> list[Reason]:
    return [i.reason for i in decode_all(data) if isinstance(i, fp.Rejected)]


def test_bad_crc() -> None:
    data = bytearray(fp.encode(fp.KeyPress(fp.Key.CALL), device_id=7, counter=3, key=KEY))
    data[-1] ^= 0x01
    items = decode_all(bytes(data))
    first = items[0]
    assert isinstance(first, fp.Rejected)
    assert first.reason is Reason.BAD_CRC
    assert (first.device_id, first.counter) == (7, 3)
    assert not only_frames(items)
    assert fp.decode_frame(bytes(data)).reason is Reason.BAD_CRC


@given(st.integers(0, 23), st.integers(1, 255))
@settings(max_examples=100, deadline=None)
def test_any_single_byte_change_is_caught(index: int, xor: int) -> None:
    data = bytearray(fp.encode(fp.KeyPress(fp.Key.CALL), device_id=7, counter=3, key=KEY))
    data[index] ^= xor
    assert not only_frames(decode_all(bytes(data)))


def test_too_long() -> None:
    data = build(length=fp.MAX_PAYLOAD + 1, payload=bytes(fp.MAX_PAYLOAD + 1))
    items = decode_all(data)
    assert items[0].reason is Reason.TOO_LONG
    assert len(items[0].data) == 13
    assert not only_frames(items)
    # The maximum itself is not too long: it fails later, on its type.
    assert reasons(build(payload=bytes(fp.MAX_PAYLOAD)))[0] is Reason.MALFORMED


@pytest.mark.parametrize("type_code", [0x00, 0x04, 0x7F, 0x80, 0x83, 0xFF])
def test_unknown_type(type_code: int) -> None:
    data = build(type_code=type_code)
    assert reasons(data) == [Reason.UNKNOWN_TYPE]
    result = fp.decode_frame(data)
    assert result.reason is Reason.UNKNOWN_TYPE
    assert result.data == data


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_bad_version(version: int) -> None:
    data = build(version=version)
    assert reasons(data) == [Reason.BAD_VERSION]
    # A frame of another version is skipped cleanly: the next one is still found.
    good = fp.encode(fp.KeyPress(fp.Key.UP), device_id=1001, counter=2, key=KEY)
    items = decode_all(data + good)
    assert [type(i) for i in items] == [fp.Rejected, fp.Frame]


@pytest.mark.parametrize(
    ("type_code", "payload"),
    [
        (0x01, b""),  # KEY, too short
        (0x01, b"\x01\x01"),  # KEY, too long
        (0x01, b"\x00"),  # undefined key code
        (0x01, b"\x05"),
        (0x02, bytes.fromhex("0bb857b9")),  # HEARTBEAT, 4 bytes
        (0x02, bytes.fromhex("0bb865b900")),  # battery 101 %
        (0x02, bytes.fromhex("0bb857b904")),  # a reserved flag bit
        (0x03, b"\x00\x00\x01"),  # CALLER_ACK, 3 bytes
        (0x81, bytes.fromhex("0000000101")),  # ACK status 1 is reserved
        (0x81, bytes.fromhex("00000001")),  # ACK without status
        (0x82, bytes.fromhex("070101010000")),  # undefined caller state
        (0x82, bytes.fromhex("020501010000")),  # undefined LED colour
        (0x82, bytes.fromhex("020104010000")),  # undefined LED pattern
        (0x82, bytes.fromhex("020101040000")),  # undefined buzzer pattern
        (0x82, bytes.fromhex("0201010100")),  # FEEDBACK, 5 bytes
    ],
)
def test_malformed_payload(type_code: int, payload: bytes) -> None:
    data = build(type_code=type_code, payload=payload)
    assert reasons(data) == [Reason.MALFORMED]
    assert fp.decode_frame(data).reason is Reason.MALFORMED


def test_parse_payload_raises_payload_error() -> None:
    with pytest.raises(fp.PayloadError, match="expected 1"):
        fp.parse_payload(fp.MsgType.KEY, b"")
    assert fp.parse_payload(fp.MsgType.KEY, b"\x02") == fp.KeyPress(fp.Key.HANGUP)


def test_heartbeat_sentinels() -> None:
    hb = fp.parse_payload(fp.MsgType.HEARTBEAT, bytes.fromhex("0000ff8001"))
    assert hb == fp.Heartbeat(0, None, None, True, False)
    hb = fp.parse_payload(fp.MsgType.HEARTBEAT, bytes.fromhex("ffff647f02"))
    assert hb == fp.Heartbeat(0xFFFF, 100, 127, False, True)


def test_counter_zero_is_malformed() -> None:
    data = build(counter=0)
    items = decode_all(data)
    assert [i.reason for i in items] == [Reason.MALFORMED]
    assert "counter 0" in items[0].detail


def test_truncated_on_flush() -> None:
    data = fp.encode(fp.KeyPress(fp.Key.CALL), device_id=1, counter=1, key=KEY)
    decoder = fp.FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    (item,) = decoder.flush()
    assert item.reason is Reason.TRUNCATED
    assert item.data == data[:-1]
    assert decoder.flush() == []
    assert fp.decode_frame(data[:5]).reason is Reason.TRUNCATED


def test_garbage() -> None:
    (item,) = decode_all(b"hello, world")
    assert item.reason is Reason.GARBAGE
    assert item.data == b"hello, world"
    # Long noise is reported in bounded pieces.
    items = decode_all(bytes(1000))
    assert all(i.reason is Reason.GARBAGE and len(i.data) <= 256 for i in items)
    assert sum(len(i.data) for i in items) == 1000


def test_split_sync_is_kept() -> None:
    data = fp.encode(fp.KeyPress(fp.Key.CALL), device_id=1, counter=1, key=KEY)
    decoder = fp.FrameDecoder()
    first = decoder.feed(b"xx" + data[:1])
    assert [i.reason for i in first] == [Reason.GARBAGE]
    assert first[0].data == b"xx"
    assert [i.raw for i in decoder.feed(data[1:])] == [data]


# --- one frame per MQTT message ----------------------------------------------


def test_decode_frame_exact() -> None:
    data = fp.encode(fp.Ack(5), device_id=42, counter=6, key=KEY)
    frame = fp.decode_frame(data)
    assert isinstance(frame, fp.Frame)
    assert frame.message == fp.Ack(5)


@pytest.mark.parametrize("extra", [b"\x00", b"\xa5", b"\xa5\x5a\x01", b"junk"])
def test_decode_frame_trailing_bytes(extra: bytes) -> None:
    data = fp.encode(fp.Ack(5), device_id=42, counter=6, key=KEY)
    for message in (data + extra, extra + data):
        result = fp.decode_frame(message)
        assert isinstance(result, fp.Rejected)
        assert result.reason is Reason.MALFORMED
        assert (result.device_id, result.counter) == (42, 6)


def test_decode_frame_two_frames() -> None:
    a = fp.encode(fp.KeyPress(fp.Key.CALL), device_id=1, counter=1, key=KEY)
    b = fp.encode(fp.KeyPress(fp.Key.HANGUP), device_id=1, counter=2, key=KEY)
    result = fp.decode_frame(a + b)
    assert isinstance(result, fp.Rejected)
    assert result.reason is Reason.MALFORMED
    assert "2 frames" in result.detail


def test_decode_frame_empty_and_noise() -> None:
    assert fp.decode_frame(b"").reason is Reason.MALFORMED
    assert fp.decode_frame(b"noise").reason is Reason.GARBAGE


# --- MACs ---------------------------------------------------------------------


@FAST
@given(frames(), keys)
def test_wrong_key_fails(f: tuple[fp.Message, int, int, bytes, bytes], other: bytes) -> None:
    _, _, _, key, data = f
    frame = fp.decode_frame(data)
    assert isinstance(frame, fp.Frame)
    assert fp.verify_mac(frame, key)
    if other != key:
        assert not fp.verify_mac(frame, other)


def test_mac_binds_the_header() -> None:
    """A frame re-addressed to another device, with a fixed-up CRC, fails its MAC."""
    data = bytearray(fp.encode(fp.KeyPress(fp.Key.CALL), device_id=1001, counter=1, key=KEY))
    data[7] ^= 0x01  # device 1000
    data[-2:] = fp.crc16(data[2:-2]).to_bytes(2, "big")
    frame = fp.decode_frame(bytes(data))
    assert isinstance(frame, fp.Frame)
    assert frame.device_id == 1000
    assert not fp.verify_mac(frame, KEY)
    assert not fp.verify_mac(frame, OTHER_KEY)


# --- replay protection ----------------------------------------------------------


MAC_A = b"A" * 8
MAC_B = b"B" * 8


def test_replay_guard_verdicts() -> None:
    guard = fp.ReplayGuard()
    assert guard.high_water(1) == 0
    assert guard.check(1, 1, MAC_A) is Verdict.NEW
    guard.accept(1, 1, MAC_A)
    assert guard.high_water(1) == 1
    assert guard.check(1, 1, MAC_A) is Verdict.DUPLICATE  # a retransmission
    assert guard.check(1, 1, MAC_B) is Verdict.REPLAY  # same counter, other content
    assert guard.check(1, 2, MAC_B) is Verdict.NEW
    guard.accept(1, 5, MAC_B)
    assert guard.check(1, 3, MAC_A) is Verdict.REPLAY  # lower, never accepted
    assert guard.check(1, 1, MAC_A) is Verdict.DUPLICATE  # still in the window
    assert guard.check(1, 6, MAC_A) is Verdict.NEW
    # Devices are independent.
    assert guard.check(2, 1, MAC_A) is Verdict.NEW
    assert guard.high_water(2) == 0


def test_replay_guard_window_eviction() -> None:
    guard = fp.ReplayGuard(window=3)
    for counter in range(1, 5):
        guard.accept(9, counter, bytes([counter]) * 8)
    assert guard.check(9, 1, bytes([1]) * 8) is Verdict.REPLAY  # evicted
    for counter in (2, 3, 4):
        assert guard.check(9, counter, bytes([counter]) * 8) is Verdict.DUPLICATE
    assert guard.high_water(9) == 4
    with pytest.raises(ValueError, match="window"):
        fp.ReplayGuard(window=0)


def test_replay_guard_load_and_forget() -> None:
    guard = fp.ReplayGuard(window=4)
    guard.load(3, 100, [(99, MAC_A), (97, MAC_B)])
    assert guard.high_water(3) == 100
    assert guard.check(3, 99, MAC_A) is Verdict.DUPLICATE
    assert guard.check(3, 97, MAC_B) is Verdict.DUPLICATE
    assert guard.check(3, 98, MAC_A) is Verdict.REPLAY
    assert guard.check(3, 100, MAC_A) is Verdict.REPLAY  # at the mark, not remembered
    assert guard.check(3, 101, MAC_A) is Verdict.NEW
    # load never lowers a mark that is already higher.
    guard.accept(3, 150, MAC_A)
    guard.load(3, 120, [])
    assert guard.high_water(3) == 150
    # A recent frame above the stored mark raises it.
    other = fp.ReplayGuard()
    other.load(4, 10, [(12, MAC_A)])
    assert other.high_water(4) == 12
    # A replaced caller starts again at 1.
    guard.forget(3)
    assert guard.high_water(3) == 0
    assert guard.check(3, 1, MAC_A) is Verdict.NEW


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([MAC_A, MAC_B])), max_size=40))
def test_replay_guard_accepts_only_rising_counters(seq: list[tuple[int, bytes]]) -> None:
    """Accepting exactly the NEW frames keeps every accepted counter strictly rising."""
    guard = fp.ReplayGuard()
    accepted: list[int] = []
    for counter, mac in seq:
        verdict = guard.check(1, counter, mac)
        if verdict is Verdict.NEW:
            assert counter > guard.high_water(1)
            guard.accept(1, counter, mac)
            accepted.append(counter)
        elif verdict is Verdict.DUPLICATE:
            assert counter in accepted
    assert accepted == sorted(set(accepted))


def test_replay_guard_reaccept_moves_to_newest_and_checks_mac_length() -> None:
    guard = fp.ReplayGuard(window=2)
    guard.accept(5, 1, MAC_A)
    guard.accept(5, 2, MAC_B)
    guard.accept(5, 1, MAC_A)  # the same frame again: now the newest, not a second slot
    guard.accept(5, 3, MAC_B)
    assert guard.check(5, 1, MAC_A) is Verdict.DUPLICATE
    assert guard.check(5, 2, MAC_B) is Verdict.REPLAY  # pushed out by 1 and 3
    with pytest.raises(ValueError, match="MAC is 8 bytes, got 3"):
        guard.accept(5, 4, b"abc")
