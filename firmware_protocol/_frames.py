"""Frame layout, message types and encoding.  Pure: no I/O, no clock.

See SPEC.md beside this file for the byte-level contract.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from ._crc import crc16

__all__ = [
    "HEADER_LEN",
    "KEY_LEN",
    "MAC_LEN",
    "MAX_COUNTER",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "OVERHEAD",
    "SYNC",
    "VERSION",
    "Ack",
    "AckStatus",
    "Buzzer",
    "CallerAck",
    "CallerState",
    "Feedback",
    "Frame",
    "Heartbeat",
    "Key",
    "KeyPress",
    "LedColor",
    "LedPattern",
    "Message",
    "MsgType",
    "PayloadError",
    "compute_mac",
    "encode",
    "parse_payload",
    "verify_mac",
]

SYNC = b"\xa5\x5a"
VERSION = 1
HEADER_LEN = 13  # sync(2) version(1) type(1) device(4) counter(4) length(1)
MAC_LEN = 8
CRC_LEN = 2
KEY_LEN = 16
MAX_PAYLOAD = 64
OVERHEAD = HEADER_LEN + MAC_LEN + CRC_LEN
MAX_FRAME = OVERHEAD + MAX_PAYLOAD
MAX_COUNTER = 0xFFFFFFFF

_HEADER = struct.Struct(">2sBBIIB")


class MsgType(IntEnum):
    # Uplink (caller -> gateway) types have bit 7 clear; downlink types have it
    # set, so a frame can never be reflected back at its sender and accepted.
    KEY = 0x01
    HEARTBEAT = 0x02
    CALLER_ACK = 0x03
    ACK = 0x81
    FEEDBACK = 0x82

    @property
    def uplink(self) -> bool:
        return not self.value & 0x80


class Key(IntEnum):
    CALL = 1  # green: call the village secretary
    HANGUP = 2  # red
    UP = 3  # thumbs up: satisfied
    DOWN = 4  # thumbs down: not satisfied


class AckStatus(IntEnum):
    STORED = 0  # the frame is durably recorded; stop repeating it


class CallerState(IntEnum):
    IDLE = 0
    RECEIVED = 1  # the call is recorded; the gateway is finding someone
    HELP_COMING = 2  # a person has accepted the call
    ON_SITE = 3  # the person has arrived
    CANCELLED = 4  # the call was cancelled by the red key
    THANKS = 5  # a rating was recorded
    STILL_TRYING = 6  # nobody has accepted yet; the call went up a level


class LedColor(IntEnum):
    OFF = 0
    GREEN = 1
    RED = 2
    AMBER = 3
    BLUE = 4


class LedPattern(IntEnum):
    OFF = 0
    STEADY = 1
    SLOW_BLINK = 2  # 1 Hz
    FAST_BLINK = 3  # 4 Hz


class Buzzer(IntEnum):
    SILENT = 0
    SHORT = 1  # one 100 ms beep
    DOUBLE = 2  # two 100 ms beeps, 100 ms apart
    LONG = 3  # one 1 s beep


class PayloadError(ValueError):
    """A frame passed its CRC but its payload does not fit its type."""


@dataclass(frozen=True, slots=True)
class KeyPress:
    key: Key


@dataclass(frozen=True, slots=True)
class Heartbeat:
    battery_mv: int
    battery_pct: int | None  # None: the caller cannot tell
    signal_dbm: int | None  # None: wired bus, no radio
    external_power: bool
    low_battery: bool


@dataclass(frozen=True, slots=True)
class Ack:
    acked_counter: int
    status: AckStatus = AckStatus.STORED


@dataclass(frozen=True, slots=True)
class CallerAck:
    acked_counter: int


@dataclass(frozen=True, slots=True)
class Feedback:
    state: CallerState
    led_color: LedColor
    led_pattern: LedPattern
    buzzer: Buzzer
    hold_s: int = 0  # 0: keep until the next feedback


Message = KeyPress | Heartbeat | Ack | CallerAck | Feedback

_TYPE_OF: dict[type, MsgType] = {
    KeyPress: MsgType.KEY,
    Heartbeat: MsgType.HEARTBEAT,
    CallerAck: MsgType.CALLER_ACK,
    Ack: MsgType.ACK,
    Feedback: MsgType.FEEDBACK,
}

_HB = struct.Struct(">HBbB")
_ACK = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_FB = struct.Struct(">BBBBH")

_HB_PCT_UNKNOWN = 0xFF
_HB_SIGNAL_NONE = -128
_HB_EXTERNAL_POWER = 0x01
_HB_LOW_BATTERY = 0x02


def _check_range(what: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{what} {value} is outside {low}..{high}")


def _check(message: Message) -> None:
    """Refuse to encode what a receiver would reject or misread."""
    if isinstance(message, KeyPress):
        Key(message.key)
    elif isinstance(message, Heartbeat):
        _check_range("battery_mv", message.battery_mv, 0, 0xFFFF)
        if message.battery_pct is not None:
            _check_range("battery_pct", message.battery_pct, 0, 100)
        if message.signal_dbm is not None:
            _check_range("signal_dbm", message.signal_dbm, -127, 127)
    elif isinstance(message, Ack | CallerAck):
        _check_range("acked_counter", message.acked_counter, 0, MAX_COUNTER)
    elif isinstance(message, Feedback):
        CallerState(message.state)
        LedColor(message.led_color)
        LedPattern(message.led_pattern)
        Buzzer(message.buzzer)
        _check_range("hold_s", message.hold_s, 0, 0xFFFF)


def _payload(message: Message) -> bytes:
    _check(message)
    if isinstance(message, KeyPress):
        return bytes((int(message.key),))
    if isinstance(message, Heartbeat):
        flags = (_HB_EXTERNAL_POWER if message.external_power else 0) | (
            _HB_LOW_BATTERY if message.low_battery else 0
        )
        pct = _HB_PCT_UNKNOWN if message.battery_pct is None else message.battery_pct
        sig = _HB_SIGNAL_NONE if message.signal_dbm is None else message.signal_dbm
        return _HB.pack(message.battery_mv, pct, sig, flags)
    if isinstance(message, Ack):
        return _ACK.pack(message.acked_counter, int(message.status))
    if isinstance(message, CallerAck):
        return _U32.pack(message.acked_counter)
    if isinstance(message, Feedback):
        return _FB.pack(
            int(message.state),
            int(message.led_color),
            int(message.led_pattern),
            int(message.buzzer),
            message.hold_s,
        )
    raise TypeError(f"not a protocol message: {message!r}")


def _enum(enum: type[IntEnum], value: int, what: str) -> IntEnum:
    try:
        return enum(value)
    except ValueError:
        raise PayloadError(f"{what} 0x{value:02x} is not defined") from None


def parse_payload(msg_type: MsgType, payload: bytes) -> Message:
    """Turn a payload into its message; raise PayloadError when it does not fit."""
    expected = _PAYLOAD_LEN[msg_type]
    if len(payload) != expected:
        raise PayloadError(f"{msg_type.name} payload is {len(payload)} bytes, expected {expected}")
    if msg_type is MsgType.KEY:
        return KeyPress(Key(_enum(Key, payload[0], "key code")))
    if msg_type is MsgType.HEARTBEAT:
        mv, pct, sig, flags = _HB.unpack(payload)
        if pct != _HB_PCT_UNKNOWN and pct > 100:
            raise PayloadError(f"battery percentage {pct} is over 100")
        if flags & ~(_HB_EXTERNAL_POWER | _HB_LOW_BATTERY):
            raise PayloadError(f"heartbeat flags 0x{flags:02x} set reserved bits")
        return Heartbeat(
            battery_mv=mv,
            battery_pct=None if pct == _HB_PCT_UNKNOWN else pct,
            signal_dbm=None if sig == _HB_SIGNAL_NONE else sig,
            external_power=bool(flags & _HB_EXTERNAL_POWER),
            low_battery=bool(flags & _HB_LOW_BATTERY),
        )
    if msg_type is MsgType.ACK:
        counter, status = _ACK.unpack(payload)
        return Ack(counter, AckStatus(_enum(AckStatus, status, "ack status")))
    if msg_type is MsgType.CALLER_ACK:
        return CallerAck(_U32.unpack(payload)[0])
    state, color, pattern, buzzer, hold = _FB.unpack(payload)
    return Feedback(
        state=CallerState(_enum(CallerState, state, "caller state")),
        led_color=LedColor(_enum(LedColor, color, "LED colour")),
        led_pattern=LedPattern(_enum(LedPattern, pattern, "LED pattern")),
        buzzer=Buzzer(_enum(Buzzer, buzzer, "buzzer pattern")),
        hold_s=hold,
    )


_PAYLOAD_LEN = {
    MsgType.KEY: 1,
    MsgType.HEARTBEAT: _HB.size,
    MsgType.CALLER_ACK: _U32.size,
    MsgType.ACK: _ACK.size,
    MsgType.FEEDBACK: _FB.size,
}


def compute_mac(key: bytes, authenticated: bytes | memoryview) -> bytes:
    """First 8 bytes of HMAC-SHA256(key, VERSION..PAYLOAD)."""
    return hmac.digest(key, authenticated, hashlib.sha256)[:MAC_LEN]


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame that passed its CRC and whose payload fits its type.

    Its MAC is not yet checked: that needs the device's key, which the
    receiver looks up by ``device_id`` (see :func:`verify_mac`).
    """

    type: MsgType
    device_id: int
    counter: int
    message: Message
    mac: bytes
    raw: bytes

    @property
    def authenticated(self) -> bytes:
        return self.raw[len(SYNC) : -(MAC_LEN + CRC_LEN)]


def verify_mac(frame: Frame, key: bytes) -> bool:
    return hmac.compare_digest(compute_mac(key, frame.authenticated), frame.mac)


def encode(message: Message, *, device_id: int, counter: int, key: bytes) -> bytes:
    """Build a complete frame, sync to CRC, ready for the wire or an MQTT payload."""
    if not 0 <= device_id <= 0xFFFFFFFF:
        raise ValueError(f"device id {device_id} does not fit in 32 bits")
    if not 1 <= counter <= MAX_COUNTER:
        raise ValueError(f"frame counter {counter} is outside 1..{MAX_COUNTER}")
    if len(key) != KEY_LEN:
        raise ValueError(f"device key is {len(key)} bytes, expected {KEY_LEN}")
    payload = _payload(message)
    header = _HEADER.pack(SYNC, VERSION, _TYPE_OF[type(message)], device_id, counter, len(payload))
    body = header[len(SYNC) :] + payload
    mac = compute_mac(key, body)
    crc = crc16(body + mac)
    return header + payload + mac + crc.to_bytes(2, "big")


def unpack_header(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """(version, type, device_id, counter, payload length) of a buffered header."""
    _sync, version, msg_type, device_id, counter, length = _HEADER.unpack_from(buf, 0)
    return version, msg_type, device_id, counter, length
