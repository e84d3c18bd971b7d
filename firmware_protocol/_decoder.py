"""Streaming frame decoder: bytes in arbitrary chunks in, frames and rejections out."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ._crc import crc16
from ._frames import (
    CRC_LEN,
    HEADER_LEN,
    MAC_LEN,
    MAX_PAYLOAD,
    SYNC,
    VERSION,
    Frame,
    MsgType,
    PayloadError,
    parse_payload,
    unpack_header,
)

__all__ = ["FrameDecoder", "Reason", "Rejected", "decode_frame"]

# Garbage is reported in pieces of at most this many bytes, so that a noisy
# line cannot make one rejection hold an unbounded buffer.
_GARBAGE_REPORT_MAX = 256


class Reason(StrEnum):
    """Why bytes or a frame were not accepted.  Values are stable metric labels."""

    GARBAGE = "garbage"  # bytes outside any frame, skipped while hunting for sync
    TOO_LONG = "too_long"  # the length field exceeds the maximum payload
    BAD_CRC = "bad_crc"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED = "malformed"  # the payload does not fit its type
    TRUNCATED = "truncated"  # the input ended inside a frame
    # Raised by receivers after decoding, kept here so every rejection shares one
    # vocabulary:
    UNKNOWN_DEVICE = "unknown_device"
    BAD_MAC = "bad_mac"
    REPLAY = "replay"
    WRONG_DIRECTION = "wrong_direction"
    TOPIC_MISMATCH = "topic_mismatch"


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    data: bytes
    detail: str
    device_id: int | None = None
    counter: int | None = None


class FrameDecoder:
    """Accepts bytes in any chunking and returns what they contained.

    Resynchronisation: after garbage, a bad CRC or an impossible length the
    decoder drops a single byte and hunts for the next sync pattern, so a valid
    frame that starts inside a damaged one is still found.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | Rejected]:
        self._buf += data
        out: list[Frame | Rejected] = []
        buf = self._buf
        while buf:
            start = buf.find(SYNC)
            if start < 0:
                # Keep a trailing first sync byte: its partner may be in the next chunk.
                keep = 1 if buf[-1] == SYNC[0] else 0
                self._garbage(out, len(buf) - keep)
                break
            if start:
                self._garbage(out, start)
                continue
            if len(buf) < HEADER_LEN:
                break
            version, type_code, device_id, counter, length = unpack_header(buf)
            if length > MAX_PAYLOAD:
                out.append(
                    Rejected(
                        Reason.TOO_LONG,
                        bytes(buf[:HEADER_LEN]),
                        f"length field {length} exceeds the maximum payload {MAX_PAYLOAD}",
                        device_id,
                        counter,
                    )
                )
                del buf[:1]
                continue
            total = HEADER_LEN + length + MAC_LEN + CRC_LEN
            if len(buf) < total:
                break
            got = int.from_bytes(buf[total - CRC_LEN : total], "big")
            want = crc16(memoryview(buf)[len(SYNC) : total - CRC_LEN])
            if got != want:
                out.append(
                    Rejected(
                        Reason.BAD_CRC,
                        bytes(buf[:total]),
                        f"CRC 0x{got:04x} does not match computed 0x{want:04x}",
                        device_id,
                        counter,
                    )
                )
                del buf[:1]
                continue
            raw = bytes(buf[:total])
            del buf[:total]
            out.append(_interpret(raw, version, type_code, device_id, counter, length))
        return out

    def idle(self) -> list[Frame | Rejected]:
        """The line has gone quiet with a partial frame buffered.

        A frame cut short by a collision may carry a length field that promises
        more bytes than will ever come, holding back a good frame that follows
        it.  Since no sender pauses inside a frame, silence means the buffered
        candidate is dead: drop its first byte and hunt again.
        """
        out: list[Frame | Rejected] = []
        while self._buf:
            out.append(
                Rejected(Reason.TRUNCATED, bytes(self._buf[:HEADER_LEN]),
                         f"line went quiet {len(self._buf)} bytes into a frame")
            )
            del self._buf[:1]
            out.extend(self.feed(b""))
        return out

    def flush(self) -> list[Rejected]:
        """Report and drop a partial frame, e.g. when the port closes."""
        if not self._buf:
            return []
        data = bytes(self._buf)
        self._buf.clear()
        return [Rejected(Reason.TRUNCATED, data, f"input ended {len(data)} bytes into a frame")]

    def _garbage(self, out: list[Frame | Rejected], n: int) -> None:
        if n <= 0:
            return
        skipped = bytes(self._buf[:n])
        del self._buf[:n]
        if out and isinstance(out[-1], Rejected) and out[-1].reason is Reason.GARBAGE:
            prev = out.pop()
            skipped = prev.data + skipped
        for i in range(0, len(skipped), _GARBAGE_REPORT_MAX):
            piece = skipped[i : i + _GARBAGE_REPORT_MAX]
            out.append(Rejected(Reason.GARBAGE, piece, f"{len(piece)} bytes outside any frame"))


def _interpret(
    raw: bytes, version: int, type_code: int, device_id: int, counter: int, length: int
) -> Frame | Rejected:
    if version != VERSION:
        return Rejected(
            Reason.BAD_VERSION,
            raw,
            f"protocol version {version} is not supported (expected {VERSION})",
            device_id,
            counter,
        )
    try:
        msg_type = MsgType(type_code)
    except ValueError:
        return Rejected(
            Reason.UNKNOWN_TYPE,
            raw,
            f"message type 0x{type_code:02x} is not defined",
            device_id,
            counter,
        )
    if counter == 0:
        return Rejected(Reason.MALFORMED, raw, "frame counter 0 is reserved", device_id, counter)
    payload = raw[HEADER_LEN : HEADER_LEN + length]
    try:
        message = parse_payload(msg_type, payload)
    except PayloadError as exc:
        return Rejected(Reason.MALFORMED, raw, str(exc), device_id, counter)
    mac = raw[HEADER_LEN + length : HEADER_LEN + length + MAC_LEN]
    return Frame(msg_type, device_id, counter, message, mac, raw)


def decode_frame(data: bytes) -> Frame | Rejected:
    """Decode exactly one frame, as carried in one MQTT message."""
    decoder = FrameDecoder()
    items = decoder.feed(data)
    items.extend(decoder.flush())
    frames = [i for i in items if isinstance(i, Frame)]
    if len(items) == 1:
        return items[0]
    if len(frames) == 1:
        extra = sum(len(i.data) for i in items if isinstance(i, Rejected))
        return Rejected(
            Reason.MALFORMED,
            data,
            f"{extra} bytes besides the frame in one message",
            frames[0].device_id,
            frames[0].counter,
        )
    if not frames:
        worst = next((i for i in items if i.reason is not Reason.GARBAGE), None)
        if worst is not None:
            return worst
        if not data:
            return Rejected(Reason.MALFORMED, data, "empty message")
        return Rejected(
            Reason.GARBAGE, data[:_GARBAGE_REPORT_MAX], f"{len(data)} bytes hold no frame"
        )
    return Rejected(Reason.MALFORMED, data, f"{len(frames)} frames in one message, expected one")
