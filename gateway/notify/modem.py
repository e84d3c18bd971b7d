"""A Quectel EC2x / SIMCom SIM7600-class 4G module, driven by AT commands.

What the gateway needs from the module: send SMS in Chinese, ring a phone and
learn whether a person picked up (and which key they pressed), and read the
SMS replies that come back.  The module is a second computer with its own
moods: it boots slower than the Pi, reports "SIM busy" for seconds after
power-up, drops unsolicited result codes (URCs) into the middle of command
replies, and sometimes stops answering altogether.  This driver keeps one
command in flight at a time, tells URCs from replies line by line, and
reopens and reinitialises the port when the module goes quiet.

SMS use PDU mode (``AT+CMGF=0``), not text mode with ``AT+CSCS="UCS2"``:

* long messages go out as real concatenated SMS (UDH, 67 UCS2 characters
  per part), so the secretary's phone shows one message, not "(1/3)" pieces
  that arrive out of order;
* the module never converts anything: what goes on the wire is ASCII hex we
  built ourselves, the same on Quectel and SIMCom firmware, and garbage on the
  line is easy to tell from a reply;
* incoming messages say their alphabet (DCS), so a reply typed as "1" in
  GSM 7-bit and one typed as "收到" in UCS2 both decode exactly, and the
  SMSC timestamp comes with them (useful on a Pi without a real-time clock).

Calls: ``ATD<number>;`` returns OK as soon as dialling starts; the call's
progress is followed by polling ``AT+CLCC`` (Quectel sends no URC when the
callee picks up) and by the URCs ``NO CARRIER`` / ``BUSY`` / ``NO ANSWER`` /
``+CLCC`` (SIMCom with ``AT+CLCC=1``).  DTMF comes as ``+QTONEDET: <ascii>``
(Quectel, ``AT+QTONEDET=1``) or ``+RXDTMF: <digit>`` (SIMCom, ``AT+DDET=1``).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import inspect
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import serial
import serial_asyncio_fast

from ..links._backoff import Backoff
from ..log import get_logger
from ..metrics import Metrics
from . import ChannelError, Delivery, Outgoing

__all__ = [
    "ANSWER_KINDS",
    "DEFAULT_HOW_TO_ANSWER",
    "DEFAULT_SMS_TEMPLATE",
    "AtError",
    "AtTimeout",
    "CallOutcome",
    "CallResult",
    "IncomingSms",
    "Modem",
    "ModemError",
    "SmsChannel",
    "VoiceChannel",
    "decode_sms_deliver",
    "encode_sms_submit",
    "parse_reply",
    "reset_command",
    "split_ucs2",
]

log = get_logger("gateway.notify.modem")

OnSms = Callable[[str, str, float], "Awaitable[None] | None"]


# --------------------------------------------------------------------------
# Errors


class ModemError(Exception):
    """The module could not be asked (port closed) or did not answer properly."""


class AtError(ModemError):
    """The module answered a command with ERROR, +CME ERROR or +CMS ERROR."""

    def __init__(self, command: str, final: str) -> None:
        super().__init__(f"{command}: {final}")
        self.command = command
        self.final = final


class AtTimeout(ModemError):
    """No final result code in time."""


class _SessionOver(Exception):
    """This port session cannot go on; the supervisor reopens after a backoff."""


# --------------------------------------------------------------------------
# SMS PDUs (3GPP TS 23.040): pure functions, no I/O

# The GSM 03.38 default alphabet; index = septet value.  0x1B escapes to the
# extension table.
_GSM7 = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
assert len(_GSM7) == 128
_GSM7_EXT = {
    0x0A: "\f",
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}

UCS2_SINGLE = 70  # UTF-16 code units in one SMS
UCS2_PART = 67  # ... per part when 6 octets go to the concatenation header


def split_ucs2(text: str) -> list[str]:
    """Cut ``text`` into SMS-sized pieces, counting UTF-16 code units and never
    splitting a surrogate pair (an emoji would turn into two broken halves)."""
    units = len(text.encode("utf-16-be")) // 2
    if units <= UCS2_SINGLE:
        return [text]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for char in text:
        width = 2 if ord(char) > 0xFFFF else 1
        if used + width > UCS2_PART:
            parts.append("".join(current))
            current, used = [], 0
        current.append(char)
        used += width
    if current:
        parts.append("".join(current))
    return parts


def _encode_address(number: str) -> bytes:
    digits = number[1:] if number.startswith("+") else number
    if not digits or not all(c in "0123456789*#" for c in digits) or len(digits) > 20:
        raise ValueError(f"not a phone number: {number!r}")
    toa = 0x91 if number.startswith("+") else 0x81
    nibbles = digits.replace("*", "A").replace("#", "B")
    if len(nibbles) % 2:
        nibbles += "F"
    semi = bytes(int(nibbles[i + 1] + nibbles[i], 16) for i in range(0, len(nibbles), 2))
    return bytes([len(digits), toa]) + semi


def encode_sms_submit(number: str, text: str, ref: int = 0) -> list[tuple[str, int]]:
    """SMS-SUBMIT PDUs for ``text`` in UCS2: ``[(hex, tpdu_length), ...]``, one
    per part, for ``AT+CMGS=<tpdu_length>``.  The SMSC is the SIM's own (an
    empty SCA).  ``ref`` ties the parts of one long message together."""
    address = _encode_address(number)
    parts = split_ucs2(text)
    if len(parts) > 255:
        raise ValueError(f"message too long for one concatenated SMS ({len(parts)} parts)")
    out: list[tuple[str, int]] = []
    for seq, part in enumerate(parts, 1):
        body = part.encode("utf-16-be")
        udh = b""
        first = 0x11  # SMS-SUBMIT, relative validity period
        if len(parts) > 1:
            udh = bytes([5, 0x00, 3, ref & 0xFF, len(parts), seq])
            first |= 0x40  # the user data starts with a header
        # Validity 0xA7 = 24 h: a call-out nobody received within a day is stale.
        tpdu = (
            bytes([first, 0x00])
            + address
            + bytes([0x00, 0x08, 0xA7, len(udh) + len(body)])
            + udh
            + body
        )
        out.append(((b"\x00" + tpdu).hex().upper(), len(tpdu)))
    return out


@dataclass(frozen=True, slots=True)
class IncomingSms:
    sender: str
    text: str
    timestamp: float | None  # SMSC time stamp as epoch seconds, if it made sense
    concat: tuple[int, int, int] | None = None  # (reference, total, sequence)


def _gsm7_decode(septets: list[int]) -> str:
    out: list[str] = []
    escape = False
    for s in septets:
        if escape:
            out.append(_GSM7_EXT.get(s, " "))
            escape = False
        elif s == 0x1B:
            escape = True
        else:
            out.append(_GSM7[s])
    return "".join(out)


def _unpack_septets(data: bytes, count: int) -> list[int]:
    bits = int.from_bytes(data, "little")
    return [(bits >> (7 * i)) & 0x7F for i in range(count)]


def _semi_octets(data: bytes) -> str:
    return "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in data)


def _scts(data: bytes) -> float | None:
    try:
        d = [int(_semi_octets(bytes([b]))) for b in data[:6]]
        yy, mo, dd, hh, mi, ss = d
        tz = data[6]
        swapped = ((tz & 0x0F) << 4) | (tz >> 4)
        quarters = ((swapped & 0x70) >> 4) * 10 + (swapped & 0x0F)
        offset = quarters * 15 * 60 * (-1 if swapped & 0x80 else 1)
        year = 1900 + yy if yy >= 90 else 2000 + yy
        return float(calendar.timegm((year, mo, dd, hh, mi, ss, 0, 0, 0)) - offset)
    except (ValueError, IndexError, OverflowError):
        return None


def decode_sms_deliver(pdu_hex: str) -> IncomingSms:
    """Decode an SMS-DELIVER PDU as ``AT+CMGR`` / ``AT+CMGL`` list it (with SCA).
    Raises ValueError for anything else (status reports, truncated PDUs)."""
    try:
        b = bytes.fromhex(pdu_hex.strip())
    except ValueError:
        raise ValueError("PDU is not hex") from None
    try:
        i = 1 + b[0]
        first = b[i]
        i += 1
        if first & 0x03 != 0x00:
            raise ValueError(f"not an SMS-DELIVER (first octet {first:#04x})")
        oa_len, toa = b[i], b[i + 1]
        i += 2
        raw = b[i : i + (oa_len + 1) // 2]
        i += (oa_len + 1) // 2
        if toa & 0x70 == 0x50:  # alphanumeric sender, GSM 7-bit packed
            sender = _gsm7_decode(_unpack_septets(raw, oa_len * 4 // 7))
        else:
            digits = _semi_octets(raw)[:oa_len].replace("A", "*").replace("B", "#")
            sender = ("+" if toa & 0x70 == 0x10 else "") + digits
        dcs = b[i + 1]
        i += 2
        timestamp = _scts(b[i : i + 7])
        i += 7
        udl = b[i]
        ud = b[i + 1 :]
    except IndexError:
        raise ValueError("PDU is truncated") from None
    group = dcs >> 4
    if group <= 7:
        if dcs & 0x20:
            raise ValueError("compressed SMS are not supported")
        alphabet = (dcs >> 2) & 0x03
    elif group == 0x0E:
        alphabet = 2
    elif group == 0x0F:
        alphabet = 1 if dcs & 0x04 else 0
    else:
        alphabet = 0
    header_octets = 0
    concat: tuple[int, int, int] | None = None
    if first & 0x40:
        if not ud:
            raise ValueError("PDU is truncated")
        udhl = ud[0]
        header_octets = udhl + 1
        header = ud[1:header_octets]
        j = 0
        while j + 1 < len(header):
            iei, length = header[j], header[j + 1]
            value = header[j + 2 : j + 2 + length]
            if iei == 0x00 and length == 3:
                concat = (value[0], value[1], value[2])
            elif iei == 0x08 and length == 4:
                concat = ((value[0] << 8) | value[1], value[2], value[3])
            j += 2 + length
    if alphabet == 0:
        if len(ud) * 8 < udl * 7:
            raise ValueError("PDU is truncated")
        skip = (header_octets * 8 + 6) // 7
        text = _gsm7_decode(_unpack_septets(ud, udl)[skip:])
    else:
        body = ud[header_octets:udl]
        if len(ud) < udl:
            raise ValueError("PDU is truncated")
        if alphabet == 2:
            text = body.decode("utf-16-be", errors="replace")
        else:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = body.decode("latin-1")
    return IncomingSms(sender, text, timestamp, concat)


# --------------------------------------------------------------------------
# Replies by SMS: pure

_CASE = re.compile(r"#?\s*(\d{1,10})\s*-\s*(\d{1,10})")
_TOKEN_SPLIT = re.compile(r"[\s\W_]+")
_NEGATED_BEFORE = ("没有", "还没", "没", "未", "不", "别")
_NEGATED_AFTER = ("不了", "不到", "不完", "不成")
# Ambiguity, and how it is settled:
#  * "收到" (received), "马上到" / "快到了" (coming) contain 到 but mean
#    accept, never arrived: they are matched and blanked before arrived.
#  * "好了" is "done" or just "alright"; read as resolved it could close a
#    case nobody went to, so it counts as accept (harmless if already
#    accepted; the person can still reply 办结 or 4).
#  * 不接, 不好, 未完成, 还没到, 解决不了 contain accept / resolved / arrived
#    words; a negation right before or "不了" right after cancels the word.
#  * "3点到" (will come at three) is not "3": only a digit standing alone
#    counts as a menu answer.
_DECLINE = (
    "不行", "拒绝", "没空", "没时间", "不接", "不去", "去不了", "来不了", "到不了",
    "不能去", "不方便", "接不了", "有事",
)  # fmt: skip
_ACCEPT_FIRST = (
    "收到", "马上到", "马上去", "马上来", "快到了", "快到", "就到", "这就去", "在路上",
    "没问题",
)  # fmt: skip
_RESOLVED = (
    "已办结", "办结", "已完成", "完成", "已解决", "解决了", "办好了", "处理好了", "处理完",
    "结案",
)  # fmt: skip
_ARRIVED = ("已到达", "到达", "已到", "到了", "到场", "在现场", "已经到")
_ACCEPT = ("接单", "接了", "好的", "好了", "可以", "同意", "确认", "行", "好", "嗯")
_ACCEPT_LATIN = ("ok", "okay", "yes", "y")
_DIGITS = {"1": "accept", "2": "decline", "3": "arrived", "4": "resolved"}


def _found(text: str, words: tuple[str, ...]) -> tuple[bool, str]:
    """Whether a word of ``words`` occurs not negated, and the text with every
    occurrence blanked so shorter words do not match again inside it."""
    hit = False
    for word in words:
        start = 0
        while (k := text.find(word, start)) >= 0:
            end = k + len(word)
            negated = text[max(0, k - 2) : k].endswith(_NEGATED_BEFORE) or text[
                end : end + 2
            ].startswith(_NEGATED_AFTER)
            hit = hit or not negated
            text = text[:k] + "\x00" * len(word) + text[end:]
            start = end
    return hit, text


def parse_reply(text: str) -> tuple[str, str | None] | None:
    """A person's SMS reply as ``(answer, case_code)``: answer is accept,
    decline, arrived or resolved; case_code ("1017-5") when the reply names
    one.  ``None`` when the reply is not understood: better to ignore a
    message (and log it) than to act on a guess."""
    norm = unicodedata.normalize("NFKC", text).strip().lower()
    case: str | None = None
    match = _CASE.search(norm)
    if match:
        case = f"{match.group(1)}-{match.group(2)}"
        norm = norm[: match.start()] + " " + norm[match.end() :]
    tokens = [t for t in _TOKEN_SPLIT.split(norm) if t]
    if not tokens:
        return None
    words = "".join(t for t in tokens if not t.isdigit())
    # A "no" must never turn into a yes, whatever else the reply says.
    declined, rest = _found(words, _DECLINE)
    if declined:
        return "decline", case
    digits = {t for t in tokens if t.isdigit()}
    if digits:
        if len(digits) == 1 and (digit := digits.pop()) in _DIGITS:
            return _DIGITS[digit], case
        return None  # "1 2", "13800000000": not a menu answer
    early, rest = _found(rest, _ACCEPT_FIRST)
    resolved, rest = _found(rest, _RESOLVED)
    if resolved:
        return "resolved", case
    arrived, rest = _found(rest, _ARRIVED)
    if arrived:
        return "arrived", case
    accepted, rest = _found(rest, _ACCEPT)
    if early or accepted:
        return "accept", case
    leftover = rest.replace("\x00", "")
    if leftover in _ACCEPT_LATIN:
        return "accept", case
    if leftover == "到":  # answering a roll call: "here"
        return "arrived", case
    return None


# --------------------------------------------------------------------------
# Calls


class CallResult(StrEnum):
    ANSWERED = "answered"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class CallOutcome:
    result: CallResult
    digits: str = ""  # DTMF keys the person pressed, in order
    accepted: bool = False  # the accept digit was among them
    connected_s: float = 0.0
    detail: str = ""

    @property
    def answered(self) -> bool:
        return self.result is CallResult.ANSWERED


@dataclass
class _Call:
    number: str
    started: float
    state: str = "dialing"  # dialing, alerting, active
    alerting: bool = False
    listed: bool = False  # seen in AT+CLCC at least once
    connected_at: float | None = None
    gone_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    digits: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, stat: int, now: float) -> None:
        if self.ended_at is not None:
            return
        if stat == 0:
            if self.connected_at is None:
                self.connected_at = now
            self.state = "active"
        elif stat == 3:
            self.alerting = True
            self.state = "alerting"
        elif stat == 6:
            self.vanished(now)
        self.changed.set()

    def vanished(self, now: float) -> None:
        """The call is gone (+CLCC stat 6, or no longer listed); the final
        code that says why (BUSY, NO CARRIER) usually follows: wait for it."""
        if self.gone_at is None:
            self.gone_at = now
        self.changed.set()

    def end(self, reason: str, now: float) -> None:
        if self.ended_at is None:
            self.ended_at = self.gone_at if self.gone_at is not None else now
            self.end_reason = reason
        self.changed.set()


_FINAL_CODE_GRACE_S = 0.5
_CLCC = re.compile(r'\+CLCC:\s*(\d+),(\d),(\d),(\d),(\d)(?:,"([^"]*)")?')


# --------------------------------------------------------------------------
# The line protocol

_FINAL_OK = "OK"
_FINAL_ERRORS = ("ERROR", "+CME ERROR:", "+CMS ERROR:")
_DIAL_FINALS = frozenset({"OK", "ERROR", "NO CARRIER", "BUSY", "NO ANSWER", "NO DIALTONE"})
_FINALS = frozenset({"OK", "ERROR"})
_URC_EXACT = frozenset(
    {
        "RING",
        "NO CARRIER",
        "BUSY",
        "NO ANSWER",
        "NO DIALTONE",
        "RDY",
        "SMS DONE",
        "PB DONE",
        "CALL READY",
        "SMS READY",
        "MISSED_CALL",
        "POWERED DOWN",
        "NORMAL POWER DOWN",
    }
)
_URC_PREFIXES = (
    "+CMTI:",
    "+CMT:",
    "+CDS:",
    "+CLIP:",
    "+CRING:",
    "+CLCC:",
    "+QTONEDET:",
    "+RXDTMF:",
    "+DTMF:",
    "+CREG:",
    "+CEREG:",
    "+CGREG:",
    "+CPIN:",
    "+QIND:",
    "+CFUN:",
    "+QUSIM:",
    "+CUSD:",
    "VOICE CALL:",
    "MISSED_CALL:",
)
_EOL = re.compile(rb"[\r\n]")


@dataclass
class _Pending:
    command: str
    prefix: str | None
    finals: frozenset[str]
    done: asyncio.Future[str]
    prompt: asyncio.Future[None] | None = None
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Reply:
    final: str
    lines: list[str]

    def info(self, prefix: str) -> list[str]:
        return [line[len(prefix) :].strip() for line in self.lines if line.startswith(prefix)]


class _AtProtocol(asyncio.Protocol):
    """Bytes in, lines out.  Replies may arrive a byte at a time or many lines
    in one read; lines end at CR or LF (modules send CR LF around each)."""

    def __init__(self, modem: Modem) -> None:
        self._modem = modem
        self._buf = bytearray()
        self.transport: Any = None
        self.pending: _Pending | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (m := _EOL.search(self._buf)) is not None:
            line = bytes(self._buf[: m.start()])
            del self._buf[: m.end()]
            if line:
                try:
                    self._modem._on_line(line)
                except Exception:  # a bug in line handling must not kill the reader
                    log.exception("modem line handling failed", line=line[:80])
        pending = self.pending
        if (
            pending is not None
            and pending.prompt is not None
            and not pending.prompt.done()
            and self._buf.lstrip().startswith(b">")
        ):
            # "> " has no line end: the module waits for the PDU after it.
            self._buf.clear()
            pending.prompt.set_result(None)
        elif len(self._buf) > 4096:
            self._modem._garbage(bytes(self._buf[:80]))
            self._buf.clear()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


# --------------------------------------------------------------------------
# The driver


def _cme_code(final: str) -> str:
    return final.split(":", 1)[1].strip().lower() if ":" in final else final.lower()


def _sim_busy(final: str) -> bool:
    code = _cme_code(final)
    return code in ("14", "sim busy", "515", "please wait, init or command processing in progress")


def _no_sim(final: str) -> bool:
    return _cme_code(final) in ("10", "sim not inserted", "13", "sim failure")


class Modem:
    """One module on one serial port, kept open and initialised by ``run()``.

    State for the rest of the gateway: ``ready`` (initialised and answering),
    ``registered`` (home or roaming network), ``signal_csq`` (0..31, None when
    unknown), ``last_error`` (the latest reason it is not ready, for status).
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        metrics: Metrics,
        name: str = "modem",
        command_timeout_s: float = 5.0,
        health_interval_s: float = 30.0,
        hang_after: int = 3,
        reopen_min_s: float = 1.0,
        reopen_max_s: float = 60.0,
        sim_ready_timeout_s: float = 60.0,
        sim_retry_s: float = 0.5,
        pin: str | None = None,
        sms_storage: str = "SM",
        sms_timeout_s: float = 60.0,
        min_csq: int = 1,
        dial_timeout_s: float = 20.0,
        poll_interval_s: float = 0.5,
        min_connected_s: float = 1.5,
        answer_window_s: float = 20.0,
        on_sms: OnSms | None = None,
        soft_reset: bool = True,
        reset: Callable[[], Awaitable[None]] | None = None,
        reset_boot_s: float = 20.0,
        reset_order: Sequence[str] = ("at", "command"),
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.metrics = metrics
        self.name = name
        self.command_timeout_s = command_timeout_s
        self.health_interval_s = health_interval_s
        self.hang_after = hang_after
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self.sim_ready_timeout_s = sim_ready_timeout_s
        self.sim_retry_s = sim_retry_s
        self.pin = pin
        self.sms_storage = sms_storage
        self.sms_timeout_s = sms_timeout_s
        self.min_csq = min_csq
        self.dial_timeout_s = dial_timeout_s
        self.poll_interval_s = poll_interval_s
        self.min_connected_s = min_connected_s
        self.answer_window_s = answer_window_s
        # Called for each SMS received: (sender, text, received_at).  May be a
        # coroutine function; the message is deleted from the SIM only after
        # it returns, so a crash in between repeats a message, never loses one.
        self.on_sms: OnSms | None = on_sms
        # A module that stopped answering is first only reopened (often the
        # USB serial link, not the module, was stuck).  When it still does not
        # answer after that, it is reset: by AT+CFUN=1,1 (``soft_reset``; the
        # firmware often still acts on it when nothing else is answered) and by
        # ``reset`` (a village's script toggling RESET_N or the power), taking
        # turns, in ``reset_order``.  ``reset_boot_s`` is how long a module
        # needs to boot again.
        self.soft_reset = soft_reset
        self.reset = reset
        self.reset_boot_s = reset_boot_s
        self.reset_order = tuple(reset_order)
        # Sessions since the module was last ready that ended with it silent.
        self._hung_sessions = 0

        self._protocol: _AtProtocol | None = None
        self._lock = asyncio.Lock()
        self._call_lock = asyncio.Lock()
        self._call: _Call | None = None
        self._ready = False
        self._registered = False
        self._csq: int | None = None
        self._last_error: str | None = "not started"
        self._timeouts = 0
        self._resync = False
        self._broken: asyncio.Future[str] | None = None
        self._sms_queue: asyncio.Queue[int | None] = asyncio.Queue()  # index, or None: scan all
        self._scan_queued = False
        self._concat: dict[tuple[str, int, int], tuple[float, dict[int, str]]] = {}
        self._sms_ref = int(time.time()) & 0xFF
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dtmf_supported = False
        self.ready_changed = asyncio.Event()  # set on every change of ``ready``

    # -- state -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def signal_csq(self) -> int | None:
        return self._csq

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def in_call(self) -> bool:
        return self._call is not None

    def _labels(self) -> dict[str, str]:
        return {"modem": self.name}

    def _set_ready(self, ready: bool, error: str | None = None) -> None:
        if error is not None:
            self._last_error = error
        elif ready:
            self._last_error = None
        if ready != self._ready:
            self._ready = ready
            self.ready_changed.set()
            self.ready_changed = asyncio.Event()
        self.metrics.set("gateway_modem_ready", 1 if ready else 0, **self._labels())

    def _set_network(self, registered: bool | None = None, csq: int | bool | None = False) -> None:
        if registered is not None and registered != self._registered:
            self._registered = registered
            log.info("modem network registration", modem=self.name, registered=registered)
            self.metrics.set("gateway_modem_registered", int(registered), **self._labels())
        if csq is not False:
            assert csq is not True
            self._csq = csq
            self.metrics.set("gateway_modem_csq", -1 if csq is None else csq, **self._labels())

    # -- supervision -------------------------------------------------------

    async def run(self) -> None:
        """Keep the module open and initialised until cancelled."""
        backoff = Backoff(self.reopen_min_s, self.reopen_max_s)
        loop = asyncio.get_running_loop()
        while True:
            protocol: _AtProtocol | None = None
            try:
                transport, protocol = await serial_asyncio_fast.create_serial_connection(
                    loop, lambda: _AtProtocol(self), self.port, baudrate=self.baudrate,
                    exclusive=True,
                )  # fmt: skip
            except (serial.SerialException, OSError, ValueError) as exc:
                delay = backoff.next()
                self._set_ready(False, f"port cannot be opened: {exc}")
                self.metrics.inc("gateway_modem_open_failures_total", **self._labels())
                log.warning(
                    "modem port cannot be opened; retrying",
                    modem=self.name,
                    port=self.port,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                    rate_key=self.name,
                )
                await asyncio.sleep(delay)
                continue
            assert protocol is not None
            with contextlib.suppress(Exception):
                transport.serial.reset_input_buffer()  # stale bytes from before
            self._protocol = protocol
            self._timeouts = 0
            self._resync = False
            self._broken = loop.create_future()
            self._sms_queue = asyncio.Queue()
            self._scan_queued = False
            self.metrics.inc("gateway_modem_sessions_total", **self._labels())
            log.info("modem port open", modem=self.name, port=self.port, baudrate=self.baudrate)
            work = asyncio.create_task(self._work(backoff))
            reason = "?"
            hung = False
            reset_by: str | None = None
            try:
                done, _ = await asyncio.wait(
                    [work, protocol.closed, self._broken], return_when=asyncio.FIRST_COMPLETED
                )
                if protocol.closed in done:
                    exc = protocol.closed.result()
                    reason = f"port lost: {exc}" if exc else "port lost"
                    self.metrics.inc("gateway_modem_port_losses_total", **self._labels())
                elif self._broken in done:
                    reason = self._broken.result()
                    hung = reason.startswith("module stopped answering")
                else:
                    try:
                        work.result()
                        reason = "session ended"
                    except _SessionOver as over:
                        reason = str(over)
                        hung = reason.startswith("module does not answer")
                    except Exception as exc:  # a bug: log it, start over rather than die
                        reason = f"internal error: {exc!r}"
                        log.exception("modem session failed", modem=self.name)
            finally:
                pending = protocol.pending
                if pending is not None and not pending.done.done():
                    # Whoever waits (a send_sms) learns now, not after its timeout.
                    pending.done.set_exception(ModemError(f"modem session ended: {reason}"))
                work.cancel()
                # asyncio.wait, not "await work" under suppress(CancelledError):
                # that would also swallow a cancellation of run() itself.
                await asyncio.wait([work])
                if not work.cancelled():
                    work.exception()  # seen above or irrelevant now; keep asyncio quiet
                self._end_session(reason)
                if hung:
                    reset_by = self._next_reset()
                    if reset_by == "at" and not protocol.closed.done():
                        # Written without waiting for a reply: a hung module
                        # sends none, and a rebooting one drops the line.  The
                        # transport's close() below still writes it out.
                        self._count_reset("at", reason)
                        protocol.write(b"AT+CFUN=1,1\r")
                    elif reset_by == "at":
                        reset_by = None  # the port is gone: nothing to write to
                transport.close()
            if reset_by == "command":
                self._count_reset("command", reason)
                await self._run_reset_hook()
            delay = backoff.next()
            if reset_by is not None:
                delay = max(delay, self.reset_boot_s)
                log.warning(
                    "modem reset; waiting for it to boot",
                    modem=self.name,
                    by=reset_by,
                    reopen_in_s=round(delay, 1),
                )
            else:
                log.warning("modem not ready; reopening", modem=self.name, reason=reason)
            await asyncio.sleep(delay)

    def _next_reset(self) -> str | None:
        """How to reset after one more session that ended with the module
        silent: nothing the first time (the reopen is the remedy), then the
        configured ways in turn."""
        self._hung_sessions += 1
        usable = {"at": self.soft_reset, "command": self.reset is not None}
        ways = [w for w in self.reset_order if usable.get(w)]
        if self._hung_sessions < 2 or not ways:
            return None
        return ways[(self._hung_sessions - 2) % len(ways)]

    def _count_reset(self, how: str, reason: str) -> None:
        self.metrics.inc("gateway_modem_resets_total", how=how, **self._labels())
        log.warning(
            "module still silent after a reopen; resetting it",
            modem=self.name,
            by="AT+CFUN=1,1" if how == "at" else "reset command",
            silent_sessions=self._hung_sessions,
            reason=reason,
        )

    async def _run_reset_hook(self) -> None:
        assert self.reset is not None
        try:
            await self.reset()
        except Exception as exc:
            self.metrics.inc("gateway_modem_reset_failures_total", **self._labels())
            log.error("modem reset command failed", modem=self.name, error=str(exc) or repr(exc))

    def _end_session(self, reason: str) -> None:
        self._protocol = None
        self._set_ready(False, reason)
        self._set_network(registered=False, csq=None)
        call = self._call
        if call is not None:
            call.end("modem lost", asyncio.get_running_loop().time())

    def _declare_broken(self, reason: str) -> None:
        if self._broken is not None and not self._broken.done():
            self._broken.set_result(reason)

    async def _work(self, backoff: Backoff) -> None:
        await self._initialise()
        self._set_ready(True)
        backoff.reset()
        self._hung_sessions = 0
        log.info(
            "modem ready",
            modem=self.name,
            registered=self._registered,
            csq=self._csq,
            dtmf=self.dtmf_supported,
        )
        self._sms_queue.put_nowait(None)  # messages stored while we were away
        await asyncio.gather(self._health_loop(), self._sms_loop())

    async def _initialise(self) -> None:
        # The first bytes after power-up or after opening may be lost (boot
        # noise, autobauding): a few plain ATs until one is answered.
        for attempt in range(max(self.hang_after, 2)):
            try:
                await self._command("AT", wait_s=min(self.command_timeout_s, 2.0))
                break
            except AtTimeout:
                continue
            except AtError:
                if attempt == max(self.hang_after, 2) - 1:
                    raise _SessionOver("module does not answer AT with OK") from None
        else:
            raise _SessionOver("module does not answer AT")
        try:
            await self._command("ATE0")
            await self._optional("AT+CMEE=2")  # errors as words for the log
            await self._wait_for_sim()
            await self._command("AT+CMGF=0")
            s = self.sms_storage
            await self._optional(f'AT+CPMS="{s}","{s}","{s}"')
            if not await self._optional("AT+CNMI=2,1,0,0,0"):
                log.warning("modem refuses +CMTI indications; replies are found by polling")
            await self._optional("AT+CLIP=1")
            await self._optional("AT+CREG=1")  # +CREG: <stat> on every change
            await self._optional("AT+CEREG=1")
            await self._optional("AT+CLCC=1")  # SIMCom: +CLCC on call state changes
            self.dtmf_supported = await self._optional("AT+QTONEDET=1") or await self._optional(
                "AT+DDET=1"
            )
            await self._refresh_network()
        except AtTimeout:
            raise _SessionOver("module does not answer during initialisation") from None
        except AtError as exc:
            raise _SessionOver(f"initialisation failed: {exc}") from None

    async def _optional(self, command: str) -> bool:
        try:
            await self._command(command)
            return True
        except AtError as exc:
            log.debug(
                "modem lacks an optional feature", modem=self.name, command=command, error=exc.final
            )
            return False

    async def _wait_for_sim(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sim_ready_timeout_s
        backoff = Backoff(self.sim_retry_s, max(self.sim_retry_s, 4.0))
        pin_tried = False
        while True:
            try:
                reply = await self._command("AT+CPIN?", prefix="+CPIN:")
                state = (reply.info("+CPIN:") or ["?"])[-1].upper()
                if state == "READY":
                    return
                if state == "SIM PIN" and self.pin and not pin_tried:
                    pin_tried = True
                    await self._command(f'AT+CPIN="{self.pin}"')
                    continue
                if state != "NOT READY":
                    raise _SessionOver(f"SIM needs {state}")
                why = state
            except AtError as exc:
                if _no_sim(exc.final):
                    self.metrics.inc("gateway_modem_no_sim_total", **self._labels())
                    raise _SessionOver(f"no SIM card ({exc.final})") from None
                if not _sim_busy(exc.final):
                    raise _SessionOver(f"SIM error: {exc.final}") from None
                why = exc.final
            if loop.time() > deadline:
                raise _SessionOver(f"SIM not ready after {self.sim_ready_timeout_s:.0f} s ({why})")
            delay = backoff.next()
            log.info(
                "SIM not ready yet; retrying",
                modem=self.name,
                state=why,
                retry_in_s=round(delay, 2),
            )
            await asyncio.sleep(delay)

    async def _refresh_network(self) -> None:
        stats: list[int] = []
        for command, prefix in (("AT+CREG?", "+CREG:"), ("AT+CEREG?", "+CEREG:")):
            try:
                reply = await self._command(command, prefix=prefix)
            except AtError:
                continue
            for info in reply.info(prefix):
                fields = info.split(",")
                if len(fields) >= 2 and fields[1].strip().isdigit():
                    stats.append(int(fields[1]))
        reply = await self._command("AT+CSQ", prefix="+CSQ:")
        csq: int | None = None
        for info in reply.info("+CSQ:"):
            with contextlib.suppress(ValueError):
                rssi = int(info.split(",")[0])
                csq = None if rssi == 99 else rssi
        self._set_network(registered=any(s in (1, 5) for s in stats), csq=csq)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._refresh_network()
            except AtTimeout:
                continue  # _command counts these and ends the session at hang_after
            except AtError as exc:
                log.warning(
                    "modem health check refused",
                    modem=self.name,
                    error=exc.final,
                    rate_key=self.name,
                )
            # A +CMTI can be lost (during a reopen, in line noise): look at the
            # storage now and then rather than leave a reply unread.
            if not self._scan_queued:
                self._scan_queued = True
                self._sms_queue.put_nowait(None)

    # -- commands ----------------------------------------------------------

    async def _command(
        self,
        command: str,
        *,
        wait_s: float | None = None,
        prefix: str | None = None,
        finals: frozenset[str] = _FINALS,
        payload: str | None = None,
    ) -> _Reply:
        timeout = self.command_timeout_s if wait_s is None else wait_s
        async with self._lock:
            protocol = self._protocol
            if protocol is None:
                raise ModemError("modem port is not open")
            if self._resync:
                # A reply that timed out may still arrive; let it pass and fall
                # on the floor rather than answer the next command.
                self._resync = False
                await asyncio.sleep(min(0.3, timeout / 4))
            loop = asyncio.get_running_loop()
            pending = _Pending(command, prefix, finals, loop.create_future())
            if payload is not None:
                pending.prompt = loop.create_future()
            protocol.pending = pending
            try:
                protocol.write(command.encode("ascii") + b"\r")
                async with asyncio.timeout(timeout):
                    if pending.prompt is not None:
                        await asyncio.wait(
                            [pending.prompt, pending.done], return_when=asyncio.FIRST_COMPLETED
                        )
                        if pending.prompt.done() and not pending.done.done():
                            assert payload is not None
                            protocol.write(payload.encode("ascii") + b"\x1a")
                    final = await pending.done
            except TimeoutError:
                if pending.prompt is not None:
                    protocol.write(b"\x1b")  # leave the "> " input state
                self._timeouts += 1
                self._resync = True
                self.metrics.inc("gateway_modem_timeouts_total", **self._labels())
                log.warning(
                    "modem command timed out",
                    modem=self.name,
                    command=command[:40],
                    in_a_row=self._timeouts,
                    rate_key=self.name,
                )
                if self._ready and self._timeouts >= self.hang_after:
                    self.metrics.inc("gateway_modem_hangs_total", **self._labels())
                    self._declare_broken(f"module stopped answering ({self._timeouts} timeouts)")
                raise AtTimeout(f"{command[:40]}: no reply in {timeout} s") from None
            finally:
                protocol.pending = None
            self._timeouts = 0
            if final.startswith(_FINAL_ERRORS):
                raise AtError(command[:40], final)
            return _Reply(final, pending.lines)

    # -- lines and URCs ----------------------------------------------------

    def _garbage(self, raw: bytes) -> None:
        self.metrics.inc("gateway_modem_garbage_lines_total", **self._labels())
        log.warning(
            "garbage from modem ignored",
            modem=self.name,
            data=raw[:40].hex(),
            rate_key=f"{self.name}:garbage",
        )

    def _on_line(self, raw: bytes) -> None:
        text = raw.decode("ascii", errors="replace").strip()
        if not text:
            return
        if not all(32 <= ord(c) < 127 for c in text):
            self._garbage(raw)
            return
        pending = self._protocol.pending if self._protocol is not None else None
        if pending is not None and not pending.done.done():
            if text == pending.command:
                return  # echo, before ATE0 took effect
            if text in pending.finals or text.startswith(_FINAL_ERRORS):
                pending.done.set_result(text)
                return
            if pending.prefix is not None and text.startswith(pending.prefix):
                pending.lines.append(text)
                return
        if text in _URC_EXACT or text.startswith(_URC_PREFIXES):
            self.metrics.inc("gateway_modem_urcs_total", **self._labels())
            self._on_urc(text)
            return
        if pending is not None and not pending.done.done():
            pending.lines.append(text)
            return
        # A reply to a command that timed out, or printable line noise.
        self.metrics.inc("gateway_modem_stray_lines_total", **self._labels())
        log.debug("unexpected line from modem ignored", modem=self.name, line=text[:80])

    def _on_urc(self, text: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = self._call
        if text.startswith("+CMTI:"):
            # +CMTI: "SM",3
            try:
                index = int(text.rsplit(",", 1)[1])
            except (IndexError, ValueError):
                log.warning("malformed +CMTI", modem=self.name, line=text)
                self._sms_queue.put_nowait(None)
                return
            self._sms_queue.put_nowait(index)
        elif text in ("NO CARRIER", "BUSY", "NO ANSWER", "NO DIALTONE"):
            if call is not None:
                call.end(text, now)
        elif text.startswith("+CLCC:"):
            if call is not None:
                for stat in self._our_call_states(call, [text]):
                    call.set_state(stat, now)
        elif text.startswith(("+QTONEDET:", "+RXDTMF:", "+DTMF:")):
            digit = _dtmf_digit(text)
            if call is not None and digit is not None:
                log.info("DTMF digit received", modem=self.name, number=call.number, digit=digit)
                call.digits.append(digit)
                call.changed.set()
        elif text.startswith(("+CREG:", "+CEREG:")):
            fields = text.split(":", 1)[1].split(",")
            if len(fields) == 1 and fields[0].strip().isdigit():
                self._set_network(registered=int(fields[0]) in (1, 5))
        elif text in ("RING",) or text.startswith(("+CLIP:", "+CRING:")):
            if text.startswith("+CLIP:") and call is None:
                number = text.split('"')[1] if '"' in text else "?"
                self.metrics.inc("gateway_modem_incoming_calls_total", **self._labels())
                log.info(
                    "incoming call rejected: the gateway cannot talk",
                    modem=self.name,
                    number=number,
                    rate_key=f"{self.name}:clip:{number}",
                )
                self._spawn(self._reject_incoming())
        elif text == "RDY" and self._ready:
            # The module restarted on its own (brown-out, watchdog): all our
            # settings are gone.
            self._declare_broken("module restarted (RDY)")
        else:
            log.debug("modem URC", modem=self.name, urc=text)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reject_incoming(self) -> None:
        if self._call is None:
            with contextlib.suppress(ModemError):
                await self._command("AT+CHUP")

    @staticmethod
    def _our_call_states(call: _Call, lines: list[str]) -> list[int]:
        out: list[int] = []
        for line in lines:
            m = _CLCC.match(line)
            # dir 0 = mobile originated, mode 0 = voice
            if m and m.group(2) == "0" and m.group(4) == "0":
                number = m.group(6)
                if number is None or number.lstrip("+")[-8:] == call.number.lstrip("+")[-8:]:
                    out.append(int(m.group(3)))
        return out

    # -- SMS out -----------------------------------------------------------

    def _check_usable(self, what: str) -> None:
        if not self._ready:
            raise ChannelError(f"modem not ready ({self._last_error or 'starting'})")
        if not self._registered:
            raise ChannelError(f"modem not registered on a network; cannot {what}")
        if self._csq is None or self._csq < self.min_csq:
            raise ChannelError(f"modem has no signal (CSQ {self._csq}); cannot {what}")

    async def send_sms(self, number: str, text: str) -> None:
        """Send ``text`` (any language; UCS2) to ``number``, as several linked
        parts when long.  Raises ChannelError at once when the modem cannot."""
        self._check_usable("send SMS")
        self._sms_ref = (self._sms_ref + 1) & 0xFF
        try:
            pdus = encode_sms_submit(number, text, self._sms_ref)
        except ValueError as exc:
            raise ChannelError(str(exc)) from exc
        for seq, (pdu, length) in enumerate(pdus, 1):
            try:
                await self._command(
                    f"AT+CMGS={length}", payload=pdu, prefix="+CMGS:", wait_s=self.sms_timeout_s
                )
            except ModemError as exc:
                self.metrics.inc("gateway_modem_sms_failed_total", **self._labels())
                log.warning(
                    "SMS not sent",
                    modem=self.name,
                    number=number,
                    part=seq,
                    parts=len(pdus),
                    error=str(exc),
                )
                raise ChannelError(f"SMS part {seq}/{len(pdus)} refused: {exc}") from exc
        self.metrics.inc("gateway_modem_sms_sent_total", **self._labels())
        log.info("SMS sent", modem=self.name, number=number, parts=len(pdus), chars=len(text))

    # -- SMS in ------------------------------------------------------------

    async def _sms_loop(self) -> None:
        while True:
            item = await self._sms_queue.get()
            try:
                if item is None:
                    self._scan_queued = False
                    await self._scan_stored()
                else:
                    await self._read_stored(item)
            except AtTimeout:
                continue  # counted by _command; the next scan finds the message
            except ModemError as exc:
                log.warning(
                    "reading SMS failed",
                    modem=self.name,
                    error=str(exc),
                    rate_key=f"{self.name}:smsread",
                )

    async def _scan_stored(self) -> None:
        reply = await self._command("AT+CMGL=4", prefix="+CMGL:", wait_s=self.sms_timeout_s)
        found: list[tuple[int, str]] = []
        index: int | None = None
        for line in reply.lines:
            if line.startswith("+CMGL:"):
                try:
                    index = int(line[6:].split(",")[0])
                except ValueError:
                    index = None
            elif index is not None and _is_hex(line):
                found.append((index, line))
                index = None
        for index, pdu in found:
            await self._deliver(index, pdu)

    async def _read_stored(self, index: int) -> None:
        try:
            reply = await self._command(f"AT+CMGR={index}", prefix="+CMGR:")
        except AtError:
            return  # already read by a scan, or an empty slot
        header_seen = False
        for line in reply.lines:
            if line.startswith("+CMGR:"):
                header_seen = True
            elif header_seen and _is_hex(line):
                await self._deliver(index, line)
                return

    async def _deliver(self, index: int, pdu: str) -> None:
        try:
            sms = decode_sms_deliver(pdu)
        except ValueError as exc:
            self.metrics.inc("gateway_modem_sms_undecodable_total", **self._labels())
            log.warning("undecodable SMS deleted", modem=self.name, index=index, error=str(exc))
            await self._delete(index)
            return
        text: str | None = sms.text
        if sms.concat is not None and sms.concat[1] > 1:
            text = self._reassemble(sms)
        if text is not None:
            received_at = sms.timestamp if sms.timestamp is not None else time.time()
            self.metrics.inc("gateway_modem_sms_received_total", **self._labels())
            log.info("SMS received", modem=self.name, sender=sms.sender, chars=len(text))
            callback = self.on_sms
            if callback is not None:
                try:
                    result = callback(sms.sender, text, received_at)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self.metrics.inc("gateway_modem_on_sms_errors_total", **self._labels())
                    log.exception(
                        "SMS handler failed; message dropped", modem=self.name, sender=sms.sender
                    )
        await self._delete(index)

    def _reassemble(self, sms: IncomingSms) -> str | None:
        assert sms.concat is not None
        ref, total, seq = sms.concat
        now = time.monotonic()
        for key, (first_seen, _parts) in list(self._concat.items()):
            if now - first_seen > 3600:
                log.warning("incomplete long SMS dropped", modem=self.name, sender=key[0])
                del self._concat[key]
        key = (sms.sender, ref, total)
        first_seen, parts = self._concat.setdefault(key, (now, {}))
        parts[seq] = sms.text
        if len(parts) < total:
            return None
        del self._concat[key]
        return "".join(parts[i] for i in sorted(parts))

    async def _delete(self, index: int) -> None:
        try:
            await self._command(f"AT+CMGD={index}")
        except AtError as exc:
            log.warning("SMS could not be deleted", modem=self.name, index=index, error=exc.final)

    # -- voice -------------------------------------------------------------

    async def ring(
        self, number: str, *, ring_s: float, accept_digit: str | None = None
    ) -> CallOutcome:
        """Ring ``number`` and wait for what happened.  Raises ChannelError at
        once when the modem cannot dial."""
        task = await self.start_call(number, ring_s=ring_s, accept_digit=accept_digit)
        return await task

    async def start_call(
        self, number: str, *, ring_s: float, accept_digit: str | None = None
    ) -> asyncio.Task[CallOutcome]:
        """Dial and return once the module has taken the call; the task gives
        the outcome.  ChannelError when it cannot dial (not ready, no signal,
        another call on the line, the module refuses)."""
        self._check_usable("ring")
        if not (number[1:] if number.startswith("+") else number).isdigit():
            raise ChannelError(f"not a phone number: {number!r}")
        if self._call_lock.locked():
            raise ChannelError("modem is on another call")
        await self._call_lock.acquire()
        loop = asyncio.get_running_loop()
        call = _Call(number, loop.time())
        self._call = call
        try:
            reply = await self._command(
                f"ATD{number};", finals=_DIAL_FINALS, wait_s=self.dial_timeout_s
            )
        except ModemError as exc:
            self._call = None
            self._call_lock.release()
            if isinstance(exc, AtTimeout):
                await self._hang_up()
            self.metrics.inc("gateway_modem_calls_total", result="refused", **self._labels())
            log.warning("call not dialled", modem=self.name, number=number, error=str(exc))
            raise ChannelError(f"modem cannot dial: {exc}") from exc
        if reply.final != "OK":
            call.end(reply.final, loop.time())
        self.metrics.inc("gateway_modem_calls_started_total", **self._labels())
        log.info("calling", modem=self.name, number=number, ring_s=ring_s)
        return asyncio.create_task(self._follow(call, ring_s, accept_digit))

    async def _follow(self, call: _Call, ring_s: float, accept_digit: str | None) -> CallOutcome:
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        outcome: CallOutcome | None = None
        try:
            while outcome is None:
                now = loop.time()
                if call.ended_at is not None:
                    outcome = self._classify_end(call, accept_digit)
                    break
                if call.gone_at is not None:
                    if now >= call.gone_at + _FINAL_CODE_GRACE_S:
                        # The NO CARRIER / BUSY never came (lost in line noise).
                        call.end("gone", now)
                        continue
                    wake = next_poll = call.gone_at + _FINAL_CODE_GRACE_S
                elif now >= next_poll:
                    await self._poll_call(call)
                    next_poll = loop.time() + self.poll_interval_s
                    continue
                elif call.connected_at is None:
                    wake = call.started + ring_s
                    if now >= wake:
                        await self._hang_up()
                        outcome = CallOutcome(CallResult.NO_ANSWER, detail="rang out")
                        break
                else:
                    confirmed_at = call.connected_at + self.min_connected_s
                    hold = self.answer_window_s if self.dtmf_supported else 0.0
                    if call.digits or now >= confirmed_at + hold:
                        await self._hang_up()
                        outcome = self._answered(call, accept_digit, loop.time())
                        break
                    wake = confirmed_at if now < confirmed_at else confirmed_at + hold
                call.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        call.changed.wait(), max(0.0, min(wake, next_poll) - loop.time())
                    )
        except Exception as exc:  # the modem went away mid-call
            with contextlib.suppress(Exception):
                await self._hang_up()
            outcome = CallOutcome(CallResult.FAILED, "".join(call.digits), detail=repr(exc))
        finally:
            self._call = None
            self._call_lock.release()
        self.metrics.inc("gateway_modem_calls_total", result=outcome.result.value, **self._labels())
        log.info(
            "call finished",
            modem=self.name,
            number=call.number,
            result=outcome.result.value,
            digits=outcome.digits,
            accepted=outcome.accepted,
            connected_s=round(outcome.connected_s, 1),
            detail=outcome.detail,
        )
        return outcome

    def _answered(self, call: _Call, accept_digit: str | None, now: float) -> CallOutcome:
        digits = "".join(call.digits)
        end = call.ended_at if call.ended_at is not None else now
        connected = 0.0 if call.connected_at is None else end - call.connected_at
        return CallOutcome(
            CallResult.ANSWERED,
            digits,
            accepted=accept_digit is not None and accept_digit in digits,
            connected_s=connected,
        )

    def _classify_end(self, call: _Call, accept_digit: str | None) -> CallOutcome:
        reason = call.end_reason or "?"
        assert call.ended_at is not None
        if call.connected_at is not None:
            connected = call.ended_at - call.connected_at
            if call.digits or connected >= self.min_connected_s:
                return self._answered(call, accept_digit, call.ended_at)
            # The known quirk: some phones and networks report a declined call
            # as connected and hang up within a second.
            return CallOutcome(
                CallResult.REJECTED,
                connected_s=connected,
                detail=f"connected {connected:.1f} s then {reason}",
            )
        if reason == "BUSY":
            return CallOutcome(CallResult.BUSY, detail=reason)
        if reason == "NO ANSWER":
            return CallOutcome(CallResult.NO_ANSWER, detail=reason)
        if call.alerting and reason in ("NO CARRIER", "gone", "disconnected"):
            return CallOutcome(CallResult.REJECTED, detail=f"ended while ringing: {reason}")
        return CallOutcome(CallResult.FAILED, detail=reason)

    async def _poll_call(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        try:
            reply = await self._command("AT+CLCC", prefix="+CLCC:")
        except AtError:
            return
        if call.ended_at is not None:
            return
        states = self._our_call_states(call, reply.lines)
        now = loop.time()
        if states:
            call.listed = True
            for stat in states:
                call.set_state(stat, now)
        elif call.listed or now - call.started > 5.0:
            call.vanished(now)

    async def _hang_up(self) -> None:
        try:
            await self._command("AT+CHUP")
        except AtError:
            with contextlib.suppress(ModemError):
                await self._command("ATH")
        except ModemError:
            pass


def reset_command(argv: Sequence[str], *, timeout_s: float = 30.0) -> Callable[[], Awaitable[None]]:
    """A reset hook for ``Modem(reset=...)`` that runs a village's program (a
    script toggling the module's RESET_N GPIO or its power).  The hook raises
    when the program cannot start, runs past ``timeout_s`` (it is killed) or
    exits non-zero; the driver logs and counts that and carries on."""
    args = tuple(argv)
    if not args:
        raise ValueError("reset command is empty")

    async def run() -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ModemError(f"{args[0]}: cannot start: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(timeout_s):
                _, err = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            # A script stuck on a GPIO must not linger behind the gateway.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ModemError(f"{args[0]}: still running after {timeout_s:g} s; killed") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-200:]
            raise ModemError(
                f"{args[0]}: exit status {proc.returncode}" + (f": {tail}" if tail else "")
            )
        log.info("modem reset command done", command=args[0])

    return run


def _dtmf_digit(text: str) -> str | None:
    value = text.split(":", 1)[1].strip().split(",")[0].strip().strip('"')
    if text.startswith("+QTONEDET:") and value.isdigit() and int(value) >= 32:
        value = chr(int(value))  # Quectel reports the ASCII code: 49 is "1"
    return value if len(value) == 1 and value in "0123456789*#ABCD" else None


def _is_hex(line: str) -> bool:
    return len(line) % 2 == 0 and all(c in "0123456789ABCDEFabcdef" for c in line)


# --------------------------------------------------------------------------
# Channels

DEFAULT_SMS_TEMPLATE = "{text}【单号{case}】{how_to_answer}"
DEFAULT_HOW_TO_ANSWER = "回复数字：1接单 2不接 3已到 4办结。"
# Kinds of message the person is expected to answer; others carry no menu.
ANSWER_KINDS = frozenset({"call", "urgent_call", "must_come_reminder", "unanswered_alarm"})


def _fields(
    message: Outgoing, details: Callable[[Outgoing], Mapping[str, str]] | None, how_to_answer: str
) -> dict[str, str]:
    values = {"resident": "", "address": "", "case": message.case_id or "", "text": message.text}
    if details is not None:
        values.update(details(message))
    values["how_to_answer"] = how_to_answer.format(**values) if message.kind in ANSWER_KINDS else ""
    return values


class SmsChannel:
    """Notify by SMS.  ``template`` is a format string over {resident},
    {address}, {case}, {text}, {how_to_answer}; messages with no case use
    ``notice_template``.  ``details`` supplies resident and address when the
    village's template wants them (the desk's text already names them)."""

    name = "sms"

    def __init__(
        self,
        modem: Modem,
        *,
        template: str = DEFAULT_SMS_TEMPLATE,
        notice_template: str = "{text}",
        how_to_answer: str = DEFAULT_HOW_TO_ANSWER,
        details: Callable[[Outgoing], Mapping[str, str]] | None = None,
    ) -> None:
        self.modem = modem
        self.template = template
        self.notice_template = notice_template
        self.how_to_answer = how_to_answer
        self.details = details

    def render(self, message: Outgoing) -> str:
        template = self.template if message.case_id else self.notice_template
        return template.format(**_fields(message, self.details, self.how_to_answer))

    async def send(self, message: Outgoing) -> None:
        await self.modem.send_sms(message.phone, self.render(message))


OnCallOutcome = Callable[[Outgoing, CallOutcome, Delivery], Any]


class VoiceChannel:
    """Notify by ringing the person's phone.  ``send`` returns once the module
    dials, with a task that gives the call's ``Delivery``; the outcome also
    goes to ``on_outcome(message, outcome, delivery)`` (the runtime turns an
    acceptance into an answer).  Kinds that are not calls are refused, so the
    desk falls through to the person's next channel.

    Answered is not accepted: pressing ``accept_digit`` during the call
    accepts; a call picked up without it only "reached" the person, unless
    ``answered_call_accepts`` (for a village whose module cannot hear keys
    and who decided that picking up means "I am coming")."""

    name = "voice"

    def __init__(
        self,
        modem: Modem,
        *,
        ring_s: float = 30.0,
        accept_digit: str | None = "1",
        answered_call_accepts: bool = False,
        kinds: frozenset[str] = ANSWER_KINDS,
        on_outcome: OnCallOutcome | None = None,
    ) -> None:
        self.modem = modem
        self.ring_s = ring_s
        self.accept_digit = accept_digit
        self.answered_call_accepts = answered_call_accepts
        self.kinds = kinds
        self.on_outcome = on_outcome
        self._tasks: set[asyncio.Task[Delivery]] = set()

    async def send(self, message: Outgoing) -> asyncio.Task[Delivery]:
        if message.kind not in self.kinds:
            raise ChannelError(f"voice carries calls only, not {message.kind!r}")
        call = await self.modem.start_call(
            message.phone, ring_s=self.ring_s, accept_digit=self.accept_digit
        )
        task = asyncio.create_task(self._report(message, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def verdict(self, outcome: CallOutcome) -> Delivery:
        """What the call did for the case: accepted, reached, or why not."""
        if not outcome.answered:
            return Delivery(outcome.result.value, reached=False, detail=outcome.detail)
        if outcome.accepted:
            return Delivery("accepted", True, True, f"pressed {self.accept_digit} during the call")
        if self.answered_call_accepts:
            return Delivery(
                "accepted", True, True, "picked up the call; this village counts that as accepting"
            )
        keys = f", pressed {outcome.digits}" if outcome.digits else ""
        return Delivery(
            "reached",
            True,
            False,
            f"picked up ({outcome.connected_s:.0f} s{keys}); acceptance comes by SMS or app",
        )

    async def _report(self, message: Outgoing, call: asyncio.Task[CallOutcome]) -> Delivery:
        try:
            outcome = await call
        except Exception as exc:  # the follower itself failed: the call is lost
            outcome = CallOutcome(CallResult.FAILED, detail=repr(exc))
        delivery = self.verdict(outcome)
        if self.on_outcome is not None:
            try:
                result = self.on_outcome(message, outcome, delivery)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("call outcome handler failed", person=message.person_id)
        return delivery
