"""A simulated 4G module (Quectel EC2x-like) on a pseudo-terminal, with a
scriptable phone network behind it.

    python -m simulators.modem --link /tmp/ttyMODEM                 # all defaults
    python -m simulators.modem --link /tmp/ttyMODEM --scenario scenario.json
    python -m simulators.modem --port /dev/pts/7 --answer 13800000001:3:1 \\
        --busy 13800000002 --never 13800000003 --reject 13800000004 \\
        --reply "13800000001:2:1 收到" --sim-busy 5 --garbage 2 --split-writes
    python -m simulators.modem --link /tmp/ttyMODEM --hang-after 30 \\
        --hang-cleared-by power --reset-file /tmp/modem-reset

The gateway opens ``--link`` (a symlink to a fresh pty) or the other end of
the socat pair given as ``--port``, exactly as it would open /dev/ttyUSB2.
Every SMS the gateway sends and every call it makes is printed as a JSON line
on stdout.

A scenario file (JSON, or TOML by extension) holds the same as the flags::

    {"phones": {"13800000001": {"answer_after_s": 3, "dtmf": "1",
                                 "reply": "1 收到", "reply_after_s": 2},
                "13800000002": {"busy": true},
                "13800000004": {"reject": true, "reject_quirk": true}},
     "sim": "ready", "sim_busy_s": 5, "registered": true, "csq": 23,
     "garbage_every_s": null, "split_writes": false,
     "hang_after_s": null, "hang_for_s": null, "hang_cleared_by": "cfun",
     "reset_file": null, "dtmf": "quectel",
     "inbox": [{"sender": "13800000009", "text": "到了"}]}

Numbers not listed ring until the network gives up (``NO ANSWER``).

A hung module answers nothing.  What wakes it is ``hang_cleared_by``:
``"cfun"`` (its firmware still acts on ``AT+CFUN=1,1`` and reboots) or
``"power"`` (only a power cycle or the RESET_N pin).  ``reset_file`` plays
that pin: when the file appears or its time stamp changes (``touch`` it, as a
village's reset script would toggle a GPIO), the module reboots.  A reboot,
by either way, is silence for ``boot_s``, then ``RDY``, then ``+CPIN: READY``,
and the SIM answers "SIM busy" for ``sim_busy_s``, as after power-up.

The SMS PDU code here is written apart from the gateway's on purpose: a
mistake shared by both ends would pass every test and fail on a real phone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import re
import signal
import sys
import time
import tomllib
import tty
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CallRecord", "ModemSim", "Phone", "Scenario", "SentSms", "main"]


# --------------------------------------------------------------------------
# The scenario


@dataclass
class Phone:
    """How the person behind one number behaves."""

    answer_after_s: float | None = None  # None: never picks up
    dtmf: str = ""  # keys pressed once connected
    dtmf_after_s: float = 0.3
    hangup_after_s: float | None = None  # the person hangs up this long after answering
    busy: bool = False
    busy_after_s: float = 0.3
    reject: bool = False  # declines the call while it rings ...
    reject_after_s: float = 0.5
    reject_quirk: bool = False  # ... reported first as connected, then hung up
    reject_connected_s: float = 0.5
    reply: str | None = None  # SMS sent back after receiving one
    reply_after_s: float = 0.5
    sms_error: int | None = None  # +CMS ERROR code for every SMS to this number


@dataclass
class Scenario:
    phones: dict[str, Phone] = field(default_factory=dict)
    sim: str = "ready"  # or "absent"
    sim_busy_s: float = 0.0  # +CME ERROR: 14 for this long after (re)start
    registered: bool = True
    csq: int = 23
    garbage_every_s: float | None = None
    split_writes: bool = False
    hang_after_s: float | None = None  # stop answering this long after start ...
    hang_for_s: float | None = None  # ... for this long (None: until restart())
    hang_cleared_by: str = "power"  # "cfun": AT+CFUN=1,1 still reboots a hung module
    reset_file: str | None = None  # touching this file pulls RESET_N (a reboot)
    dtmf: str | None = "quectel"  # "quectel" (+QTONEDET), "simcom" (+RXDTMF) or None
    clcc_urc: bool = False  # SIMCom: AT+CLCC=1 reports call state changes; Quectel: ERROR
    network_no_answer_s: float = 60.0
    boot_s: float = 0.3
    model: str = "EC25"
    inbox: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hang_cleared_by not in ("cfun", "power"):
            raise ValueError(
                f"hang_cleared_by must be 'cfun' or 'power', not {self.hang_cleared_by!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
        data = dict(data)
        phones = {}
        for number, spec in data.pop("phones", {}).items():
            phones[str(number)] = Phone(**spec)
        return cls(phones=phones, **data)

    @classmethod
    def load(cls, path: Path) -> Scenario:
        if path.suffix == ".toml":
            return cls.from_dict(tomllib.loads(path.read_text()))
        return cls.from_dict(json.loads(path.read_text()))

    def phone(self, number: str) -> Phone:
        return self.phones.get(number) or self.phones.get(number.lstrip("+")) or Phone()


@dataclass
class SentSms:
    number: str
    text: str
    parts: int
    part_lengths: list[int]  # UTF-16 units per part, to check the split


@dataclass
class CallRecord:
    number: str
    started: float
    answered: bool = False
    dtmf_sent: str = ""
    ended_by: str = ""  # "gateway", "busy", "reject", "no_answer", "remote", "restart"
    ended: float | None = None


# --------------------------------------------------------------------------
# PDUs, written from 3GPP TS 23.040 independently of gateway.notify.modem

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)


def _swap_digits(raw: bytes, count: int) -> str:
    out = []
    for b in raw:
        out.append("0123456789*#abc"[b & 0x0F] if b & 0x0F != 0x0F else "")
        out.append("0123456789*#abc"[b >> 4] if b >> 4 != 0x0F else "")
    return "".join(out)[:count]


def _address(number: str) -> bytes:
    digits = number.lstrip("+")
    toa = 0x91 if number.startswith("+") else 0x81
    padded = digits + ("F" if len(digits) % 2 else "")
    return bytes([len(digits), toa]) + bytes.fromhex(
        "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    )


@dataclass
class SubmitPart:
    number: str
    text: str
    units: int
    ref: int | None = None
    total: int = 1
    seq: int = 1


def decode_submit(pdu_hex: str, tpdu_length: int) -> SubmitPart:
    """An SMS-SUBMIT as the gateway sends it after ``AT+CMGS``."""
    data = bytes.fromhex(pdu_hex)
    tpdu = data[1 + data[0] :]
    if len(tpdu) != tpdu_length:
        raise ValueError(f"AT+CMGS={tpdu_length} but the TPDU has {len(tpdu)} octets")
    first = tpdu[0]
    if first & 0x03 != 0x01:
        raise ValueError("not an SMS-SUBMIT")
    da_digits, da_toa = tpdu[2], tpdu[3]
    pos = 4 + (da_digits + 1) // 2
    number = ("+" if da_toa == 0x91 else "") + _swap_digits(tpdu[4:pos], da_digits)
    dcs = tpdu[pos + 1]
    pos += 2
    pos += {0: 0, 2: 1, 1: 7, 3: 7}[(first >> 3) & 0x03]  # validity period
    udl = tpdu[pos]
    ud = tpdu[pos + 1 :]
    header = b""
    if first & 0x40:
        header = ud[: 1 + ud[0]]
    ref = None
    total = seq = 1
    k = 1
    while k + 1 < len(header):
        iei, ln = header[k], header[k + 1]
        if iei == 0x00:
            ref, total, seq = header[k + 2], header[k + 3], header[k + 4]
        elif iei == 0x08:
            ref, total, seq = header[k + 2] * 256 + header[k + 3], header[k + 4], header[k + 5]
        k += 2 + ln
    if dcs & 0x0C == 0x08:
        body = ud[len(header) : udl]
        if len(ud) != udl or udl > 140:
            raise ValueError(f"UCS2 user data length {udl} does not fit ({len(ud)} octets)")
        text = body.decode("utf-16-be")  # strict: a broken surrogate is a failure
        units = len(body) // 2
    elif dcs & 0x0C == 0x00:
        bits = int.from_bytes(ud, "little")
        skip = -(-len(header) * 8 // 7)
        septets = [(bits >> (7 * i)) & 0x7F for i in range(udl)][skip:]
        text = "".join(GSM_BASIC[s] for s in septets)
        units = len(septets)
    else:
        raise ValueError(f"unsupported DCS {dcs:#04x}")
    return SubmitPart(number, text, units, ref, total, seq)


def _gsm_encodable(text: str) -> bool:
    return all(c in GSM_BASIC and c != "\x1b" for c in text)


def _scts(when: float) -> bytes:
    # China Standard Time, as the network stamps it: +8 h = 32 quarters.
    t = time.gmtime(when + 8 * 3600)
    digits = [t.tm_year % 100, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 32]
    return bytes(((d % 10) << 4) | (d // 10) for d in digits)


def encode_deliver(sender: str, text: str, when: float, ref: int) -> list[str]:
    """SMS-DELIVER PDUs (with SCA) as the module lists them; several when long."""
    gsm = _gsm_encodable(text)
    single, part = (160, 153) if gsm else (70, 67)

    def width(c: str) -> int:  # UTF-16 units; one septet per basic GSM character
        return 2 if not gsm and ord(c) > 0xFFFF else 1

    chunks = [text]
    if sum(map(width, text)) > single:
        chunks, used = [""], 0
        for c in text:
            if used + width(c) > part:
                chunks.append("")
                used = 0
            chunks[-1] += c
            used += width(c)
    sca = bytes([0x08, 0x91]) + bytes.fromhex("683108100005F0")  # +8613800100500
    out = []
    for seq, chunk in enumerate(chunks, 1):
        header = b""
        if len(chunks) > 1:
            header = bytes([5, 0x00, 3, ref & 0xFF, len(chunks), seq])
        first = 0x04 | (0x40 if header else 0)
        if gsm:
            skip = -(-len(header) * 8 // 7)
            bits = int.from_bytes(header, "little")
            for i, c in enumerate(chunk):
                bits |= GSM_BASIC.index(c) << (7 * (skip + i))
            udl = skip + len(chunk)
            ud = bits.to_bytes(-(-udl * 7 // 8), "little")
            dcs = 0x00
        else:
            ud = header + chunk.encode("utf-16-be")
            udl = len(ud)
            dcs = 0x08
        tpdu = bytes([first]) + _address(sender) + bytes([0x00, dcs]) + _scts(when)
        out.append((sca + tpdu + bytes([udl]) + ud).hex().upper())
    return out


# --------------------------------------------------------------------------
# The module


@dataclass
class _SimCall:
    record: CallRecord
    stat: int = 2  # +CLCC: 2 dialing, 3 alerting, 0 active
    task: asyncio.Task[None] | None = None


class ModemSim:
    """The module.  ``port``: a path to open (one end of a socat pair; it is
    reopened when it vanishes and comes back), an open file descriptor, or
    None to create a pty pair whose other end is ``device_path`` (a symlink
    at ``link`` if given).  Run inside the caller's event loop."""

    def __init__(
        self,
        port: str | os.PathLike[str] | int | None = None,
        scenario: Scenario | None = None,
        *,
        link: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.scenario = scenario or Scenario()
        self.on_event = on_event
        self._path: str | None = None
        self._fd: int | None = None
        self._keep_slave: int | None = None
        self.link = Path(link) if link is not None else None
        self.device_path: str | None = None
        if isinstance(port, int):
            self._given_fd: int | None = port
        else:
            self._given_fd = None
            self._path = os.fspath(port) if port is not None else None
        # What tests assert on
        self.sms_sent: list[SentSms] = []
        self.sms_parts: list[SubmitPart] = []
        self.calls: list[CallRecord] = []
        self.commands: list[str] = []
        self.reboots: list[str] = []  # why each reboot happened: "power", "cfun", "reset_pin"
        # Module state
        self.registered = self.scenario.registered
        self.csq = self.scenario.csq
        self.hung = False
        self._booted_at = 0.0
        self._booting_until = 0.0
        self._reset_settings()
        self._storage: dict[int, tuple[int, str]] = {}  # index -> (stat, pdu)
        self._partial: dict[tuple[str, int | None], dict[int, SubmitPart]] = {}
        self._call: _SimCall | None = None
        self.incoming: str | None = None  # a caller ringing the module
        self.incoming_rejected: list[str] = []
        self._inbuf = bytearray()
        self._pdu_length: int | None = None
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self._mr = 0
        self._ref = 0

    def _reset_settings(self) -> None:
        self.echo = True
        self.cmee = 0
        self.cmgf = 1
        self.creg_n = 0
        self.cereg_n = 0
        self.clcc_urc = False

    # -- life --------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._given_fd is not None:
            self._fd = self._given_fd
        elif self._path is None:
            master, slave = os.openpty()
            tty.setraw(slave)
            # Holding the slave open keeps the master from reading EIO while
            # the gateway closes and reopens its end.
            self._fd, self._keep_slave = master, slave
            self.device_path = os.ttyname(slave)
            if self.link is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.link.unlink()
                self.link.symlink_to(self.device_path)
                self.device_path = str(self.link)
        else:
            self._fd = self._open_path()
            self.device_path = self._path
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)
        self._running = True
        self._booted_at = loop.time()
        self._spawn(self._writer())
        if self.scenario.garbage_every_s:
            self._spawn(self._garbage_loop(self.scenario.garbage_every_s))
        if self.scenario.hang_after_s is not None:
            self._spawn(self._hang_later(self.scenario.hang_after_s, self.scenario.hang_for_s))
        if self.scenario.reset_file is not None:
            self._spawn(self._watch_reset_pin(Path(self.scenario.reset_file)))
        for message in self.scenario.inbox:
            self._store_incoming(message["sender"], message["text"], notify=False)

    async def stop(self) -> None:
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._call is not None and self._call.task is not None:
            self._call.task.cancel()
        self._close_fd()
        if self._keep_slave is not None:
            os.close(self._keep_slave)
            self._keep_slave = None
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    async def __aenter__(self) -> ModemSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _open_path(self) -> int:
        assert self._path is not None
        fd = os.open(self._path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            tty.setraw(fd)
        return fd

    def _close_fd(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        if self._given_fd is None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _emit(self, kind: str, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event({"event": kind, **data})

    # -- faults, for tests -------------------------------------------------

    def hang(self, seconds: float | None = None, *, cleared_by: str | None = None) -> None:
        """Stop answering anything, for ``seconds`` or until a reboot.
        ``cleared_by`` ("cfun" or "power") overrides the scenario's
        ``hang_cleared_by``: whether ``AT+CFUN=1,1`` still gets through."""
        if cleared_by is not None:
            if cleared_by not in ("cfun", "power"):
                raise ValueError(f"cleared_by must be 'cfun' or 'power', not {cleared_by!r}")
            self.scenario.hang_cleared_by = cleared_by
        self.hung = True
        if seconds is not None:
            self._spawn(self._unhang_later(seconds))

    def unhang(self) -> None:
        self.hung = False

    def restart(self, why: str = "power") -> None:
        """A power cycle: settings lost, the SIM busy again, ``RDY`` on boot."""
        loop = asyncio.get_running_loop()
        self.reboots.append(why)
        self._emit("reboot", why=why)
        self.hung = False
        self._reset_settings()
        self._inbuf.clear()
        self._pdu_length = None
        if self._call is not None:
            self._end_call("restart", urc=None)
        self._booted_at = loop.time()
        self._booting_until = loop.time() + self.scenario.boot_s
        self._spawn(self._boot_urcs())

    def set_network(self, *, registered: bool | None = None, csq: int | None = None) -> None:
        if registered is not None and registered != self.registered:
            self.registered = registered
            stat = 1 if registered else 2
            if self.creg_n:
                self._urc(f"+CREG: {stat}")
            if self.cereg_n:
                self._urc(f"+CEREG: {stat}")
        if csq is not None:
            self.csq = csq

    def deliver_sms(self, sender: str, text: str) -> None:
        """An SMS arrives from ``sender`` (``+CMTI`` follows)."""
        self._store_incoming(sender, text, notify=True)

    def ring_in(self, number: str, rings: int = 3) -> None:
        """Someone calls the module's number (a secretary calling back)."""
        self.incoming = number
        self._spawn(self._ringing(number, rings))

    async def _ringing(self, number: str, rings: int) -> None:
        for _ in range(rings):
            if self.incoming != number:
                return
            self._urc("RING")
            self._urc(f'+CLIP: "{number}",129,"",0,"",0')
            await asyncio.sleep(0.5)
        if self.incoming == number:
            self.incoming = None
            self._urc("NO CARRIER")

    def garbage(self, data: bytes | None = None) -> None:
        self._write(data if data is not None else bytes(random.randrange(256) for _ in range(12)))

    async def _unhang_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.hung = False

    async def _hang_later(self, after: float, seconds: float | None) -> None:
        await asyncio.sleep(after)
        self.hang(seconds)

    async def _watch_reset_pin(self, path: Path) -> None:
        def stamp() -> float | None:
            try:
                return path.stat().st_mtime_ns
            except OSError:
                return None

        last = stamp()
        while True:
            await asyncio.sleep(0.05)
            now = stamp()
            if now is not None and now != last:
                self.restart("reset_pin")
            last = now

    async def _garbage_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            junk = bytes(random.choice(b"\x00\xff\xfe#@!~\x7fxq") for _ in range(9))
            self._write(b"\r\n" + junk + b"\r\n")

    async def _boot_urcs(self) -> None:
        await asyncio.sleep(self.scenario.boot_s)
        self._urc("RDY")
        await asyncio.sleep(0.05)
        if self.scenario.sim == "ready":
            self._urc("+CPIN: READY")

    # -- bytes -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._running:
            self._out.put_nowait(data)

    def _urc(self, line: str) -> None:
        if not self.hung:
            self._write(f"\r\n{line}\r\n".encode())

    def _reply(self, *lines: str) -> None:
        self._write("".join(f"\r\n{line}\r\n" for line in lines).encode())

    async def _writer(self) -> None:
        while True:
            data = await self._out.get()
            if self.scenario.split_writes:
                # A real UART hands the host replies in arbitrary pieces.
                i = 0
                while i < len(data):
                    n = random.randint(1, 5)
                    await self._write_all(data[i : i + n])
                    i += n
                    await asyncio.sleep(random.choice((0, 0, 0.001, 0.004)))
            else:
                await self._write_all(data)

    async def _write_all(self, data: bytes) -> None:
        while data:
            if self._fd is None:
                return  # the port is gone; what a module says then is lost
            try:
                n = os.write(self._fd, data)
                data = data[n:]
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                return

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self._port_lost()
            return
        self._feed(data)

    def _port_lost(self) -> None:
        self._close_fd()
        if self._path is not None and self._running:
            self._spawn(self._reopen())

    async def _reopen(self) -> None:
        # The socat pair was torn down (a USB modem unplugged); wait for the
        # port to come back, as a re-enumerated module would.
        while self._running:
            await asyncio.sleep(0.05)
            try:
                fd = self._open_path()
            except OSError:
                continue
            self._fd = fd
            asyncio.get_running_loop().add_reader(fd, self._readable)
            self.restart()  # plugged back in = powered up again
            return

    def _feed(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._booting_until:
            return
        if self.hung:
            self._feed_hung(data)
            return
        self._inbuf += data
        while True:
            if self._pdu_length is not None:
                end = next((i for i, b in enumerate(self._inbuf) if b in (0x1A, 0x1B)), None)
                if end is None:
                    return
                body = bytes(self._inbuf[:end]).decode("ascii", "replace").strip()
                cancel = self._inbuf[end] == 0x1B
                del self._inbuf[: end + 1]
                length, self._pdu_length = self._pdu_length, None
                if not cancel:
                    self._sms_body(body, length)
                continue
            m = re.search(rb"[\r\n]", self._inbuf)
            if m is None:
                if len(self._inbuf) > 1024:
                    self._inbuf.clear()
                return
            line = bytes(self._inbuf[: m.start()]).decode("ascii", "replace").strip()
            del self._inbuf[: m.end()]
            if line:
                if self.echo:
                    self._write(line.encode() + b"\r")
                self.commands.append(line)
                self._command(line)

    def _feed_hung(self, data: bytes) -> None:
        # Nothing is answered (what was heard is kept in ``commands`` for the
        # tests); a module whose firmware still hears a reset reboots on
        # AT+CFUN=1,1.
        self._inbuf += data
        *lines, rest = re.split(rb"[\r\n]", bytes(self._inbuf))
        self._inbuf = bytearray(rest[-1024:])
        for raw in lines:
            line = raw.decode("ascii", "replace").strip()
            if not line:
                continue
            self.commands.append(line)
            if line.upper() == "AT+CFUN=1,1" and self.scenario.hang_cleared_by == "cfun":
                self.restart("cfun")
                return

    # -- commands ----------------------------------------------------------

    def _cme(self, code: int, text: str) -> None:
        if self.cmee == 2:
            self._reply(f"+CME ERROR: {text}")
        elif self.cmee == 1:
            self._reply(f"+CME ERROR: {code}")
        else:
            self._reply("ERROR")

    def _cms(self, code: int) -> None:
        self._reply(f"+CMS ERROR: {code}" if self.cmee else "ERROR")

    def _sim_state(self) -> str:
        if self.scenario.sim != "ready":
            return "absent"
        busy_until = self._booted_at + self.scenario.sim_busy_s
        return "busy" if asyncio.get_running_loop().time() < busy_until else "ready"

    def _need_sim(self) -> bool:
        state = self._sim_state()
        if state == "absent":
            self._cme(10, "SIM not inserted")
        elif state == "busy":
            self._cme(14, "SIM busy")
        return state == "ready"

    def _command(self, line: str) -> None:
        if not line.upper().startswith("AT"):
            self._reply("ERROR")
            return
        body = line[2:]
        upper = body.upper()
        if upper == "":
            self._reply("OK")
        elif upper in ("E0", "E1"):
            self.echo = upper == "E1"
            self._reply("OK")
        elif upper in ("I", "+CGMM"):
            maker = "SIMCOM INCORPORATED" if self.scenario.model.startswith("SIM") else "Quectel"
            self._reply(maker, self.scenario.model, "Revision: SIM", "OK")
        elif m := re.fullmatch(r"\+CMEE=([012])", upper):
            self.cmee = int(m.group(1))
            self._reply("OK")
        elif upper == "+CPIN?":
            if self._need_sim():
                self._reply("+CPIN: READY", "OK")
        elif upper == "+CSQ":
            csq = self.csq if self.registered else 99
            self._reply(f"+CSQ: {csq},99", "OK")
        elif m := re.fullmatch(r"\+C(E?)REG=([012])", upper):
            if m.group(1):
                self.cereg_n = int(m.group(2))
            else:
                self.creg_n = int(m.group(2))
            self._reply("OK")
        elif m := re.fullmatch(r"\+C(E?)REG\?", upper):
            n = self.cereg_n if m.group(1) else self.creg_n
            stat = 1 if self.registered and self._sim_state() == "ready" else 2
            self._reply(f"+C{m.group(1)}REG: {n},{stat}", "OK")
        elif m := re.fullmatch(r"\+CMGF=([01])", upper):
            self.cmgf = int(m.group(1))
            self._reply("OK")
        elif upper.startswith("+CPMS="):
            used = len(self._storage)
            self._reply(f"+CPMS: {used},50,{used},50,{used},50", "OK")
        elif upper.startswith(("+CNMI=", "+CLIP=")):
            self._reply("OK")
        elif upper == "+CLCC=1":
            self.clcc_urc = self.scenario.clcc_urc
            self._reply("OK" if self.scenario.clcc_urc else "ERROR")
        elif upper == "+QTONEDET=1":
            self._reply("OK" if self.scenario.dtmf == "quectel" else "ERROR")
        elif upper == "+DDET=1":
            self._reply("OK" if self.scenario.dtmf == "simcom" else "ERROR")
        elif upper == "+CLCC":
            lines = [self._clcc_line()] if self._call is not None else []
            self._reply(*lines, "OK")
        elif m := re.fullmatch(r"D([+]?[0-9*#]+);", upper):
            self._dial(m.group(1))
        elif upper in ("+CHUP", "H", "H0"):
            if self._call is not None:
                self._end_call("gateway", urc=None)
            elif self.incoming is not None:
                self.incoming_rejected.append(self.incoming)
                self.incoming = None
            self._reply("OK")
        elif m := re.fullmatch(r"\+CMGS=(\d+)", upper):
            if not self._need_sim():
                return
            if self.cmgf != 0:
                self._cms(302)  # this simulator speaks PDU mode only
                return
            self._pdu_length = int(m.group(1))
            self._write(b"\r\n> ")
        elif m := re.fullmatch(r"\+CMGR=(\d+)", upper):
            entry = self._storage.get(int(m.group(1)))
            if entry is None:
                self._cms(321)  # invalid memory index
                return
            stat, pdu = entry
            self._storage[int(m.group(1))] = (1, pdu)
            self._reply(f"+CMGR: {stat},,{len(pdu) // 2 - 9}", pdu, "OK")
        elif m := re.fullmatch(r"\+CMGD=(\d+)(?:,(\d))?", upper):
            if m.group(2) and m.group(2) != "0":
                self._storage.clear()
            else:
                self._storage.pop(int(m.group(1)), None)
            self._reply("OK")
        elif m := re.fullmatch(r"\+CMGL=(\d)", upper):
            wanted = int(m.group(1))
            lines = []
            for index, (stat, pdu) in sorted(self._storage.items()):
                if wanted == 4 or wanted == stat:
                    lines += [f"+CMGL: {index},{stat},,{len(pdu) // 2 - 9}", pdu]
                    self._storage[index] = (1, pdu)
            self._reply(*lines, "OK")
        elif upper == "+CFUN=1,1":
            self._reply("OK")
            self.restart("cfun")
        else:
            self._reply("ERROR")

    # -- SMS ---------------------------------------------------------------

    def _sms_body(self, pdu: str, length: int) -> None:
        if not self.registered:
            self._cms(331)  # no network service
            return
        try:
            part = decode_submit(pdu, length)
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            self._emit("bad_pdu", error=str(exc))
            self._cms(304)  # invalid PDU mode parameter
            return
        refused = self.scenario.phone(part.number).sms_error
        if refused is not None:
            self._cms(refused)
            return
        self._mr = (self._mr + 1) % 256
        self.sms_parts.append(part)
        self._reply(f"+CMGS: {self._mr}", "OK")
        key = (part.number, part.ref)
        parts = self._partial.setdefault(key, {})
        parts[part.seq] = part
        if len(parts) < part.total:
            return
        del self._partial[key]
        ordered = [parts[i] for i in sorted(parts)]
        sms = SentSms(
            part.number,
            "".join(p.text for p in ordered),
            len(ordered),
            [p.units for p in ordered],
        )
        self.sms_sent.append(sms)
        self._emit("sms", number=sms.number, text=sms.text, parts=sms.parts)
        phone = self.scenario.phone(sms.number)
        if phone.reply is not None:
            self._spawn(self._reply_later(sms.number, phone.reply, phone.reply_after_s))

    async def _reply_later(self, number: str, text: str, after: float) -> None:
        await asyncio.sleep(after)
        self.deliver_sms(number, text)

    def _store_incoming(self, sender: str, text: str, *, notify: bool) -> None:
        self._ref += 1
        for pdu in encode_deliver(sender, text, time.time(), self._ref):
            index = next(i for i in range(1, 1000) if i not in self._storage)
            self._storage[index] = (0, pdu)
            if notify:
                self._urc(f'+CMTI: "SM",{index}')

    # -- calls -------------------------------------------------------------

    def _clcc_line(self) -> str:
        assert self._call is not None
        number = self._call.record.number
        toa = 145 if number.startswith("+") else 129
        return f'+CLCC: 1,0,{self._call.stat},0,0,"{number}",{toa}'

    def _dial(self, number: str) -> None:
        if not self._need_sim():
            return
        if self._call is not None:
            self._reply("ERROR")
            return
        if not self.registered:
            self._reply("NO CARRIER")
            return
        record = CallRecord(number, time.time())
        self.calls.append(record)
        self._emit("call", number=number)
        self._call = _SimCall(record)
        self._reply("OK")
        self._call.task = self._spawn(self._play(self._call, self.scenario.phone(number)))

    def _set_stat(self, call: _SimCall, stat: int) -> None:
        call.stat = stat
        if self.clcc_urc:
            self._urc(self._clcc_line())

    def _end_call(self, by: str, urc: str | None) -> None:
        call = self._call
        if call is None:
            return
        self._call = None
        call.record.ended_by = by
        call.record.ended = time.time()
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        if urc is not None:
            if self.clcc_urc:
                number = call.record.number
                self._urc(f'+CLCC: 1,0,6,0,0,"{number}",129')
            self._urc(urc)
        self._emit("call_ended", number=call.record.number, by=by)

    async def _play(self, call: _SimCall, phone: Phone) -> None:
        await asyncio.sleep(0.1)
        self._set_stat(call, 3)
        if phone.busy:
            await asyncio.sleep(phone.busy_after_s)
            self._end_call("busy", "BUSY")
            return
        if phone.reject:
            await asyncio.sleep(phone.reject_after_s)
            if phone.reject_quirk:
                self._set_stat(call, 0)
                await asyncio.sleep(phone.reject_connected_s)
            self._end_call("reject", "NO CARRIER")
            return
        if phone.answer_after_s is None:
            await asyncio.sleep(self.scenario.network_no_answer_s)
            self._end_call("no_answer", "NO ANSWER")
            return
        await asyncio.sleep(phone.answer_after_s)
        self._set_stat(call, 0)
        call.record.answered = True
        if phone.dtmf:
            await asyncio.sleep(phone.dtmf_after_s)
            for digit in phone.dtmf:
                call.record.dtmf_sent += digit
                if self.scenario.dtmf == "quectel":
                    self._urc(f"+QTONEDET: {ord(digit)}")
                elif self.scenario.dtmf == "simcom":
                    self._urc(f"+RXDTMF: {digit}")
                await asyncio.sleep(0.1)
        if phone.hangup_after_s is not None:
            await asyncio.sleep(phone.hangup_after_s)
            self._end_call("remote", "NO CARRIER")


# --------------------------------------------------------------------------
# Command line


def _scenario_from_args(args: argparse.Namespace) -> Scenario:
    scenario = Scenario.load(Path(args.scenario)) if args.scenario else Scenario()
    for spec in args.answer:
        number, *rest = spec.split(":")
        after = float(rest[0]) if rest else 2.0
        dtmf = rest[1] if len(rest) > 1 else ""
        scenario.phones.setdefault(number, Phone()).answer_after_s = after
        scenario.phones[number].dtmf = dtmf
    for number in args.busy:
        scenario.phones.setdefault(number, Phone()).busy = True
    for number in args.never:
        scenario.phones[number] = Phone()
    for number in args.reject:
        phone = scenario.phones.setdefault(number, Phone())
        phone.reject = phone.reject_quirk = True
    for spec in args.reply:
        number, after, text = spec.split(":", 2)
        phone = scenario.phones.setdefault(number, Phone())
        phone.reply, phone.reply_after_s = text, float(after)
    if args.no_sim:
        scenario.sim = "absent"
    if args.sim_busy is not None:
        scenario.sim_busy_s = args.sim_busy
    if args.no_signal:
        scenario.registered = False
    if args.garbage is not None:
        scenario.garbage_every_s = args.garbage
    if args.hang_after is not None:
        scenario.hang_after_s = args.hang_after
        scenario.hang_for_s = args.hang_for
    if args.hang_cleared_by is not None:
        scenario.hang_cleared_by = args.hang_cleared_by
    if args.reset_file is not None:
        scenario.reset_file = args.reset_file
    if args.split_writes:
        scenario.split_writes = True
    if args.dtmf is not None:
        scenario.dtmf = None if args.dtmf == "none" else args.dtmf
    if args.simcom:
        scenario.dtmf, scenario.clcc_urc, scenario.model = "simcom", True, "SIM7600"
    return scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.modem",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--link", help="create a pty and a symlink to it here")
    where.add_argument("--port", help="open this existing pty (one end of a socat pair)")
    parser.add_argument("--scenario", help="JSON or TOML scenario file")
    parser.add_argument("--answer", action="append", default=[], metavar="NUMBER[:S[:DIGITS]]")
    parser.add_argument("--busy", action="append", default=[], metavar="NUMBER")
    parser.add_argument("--never", action="append", default=[], metavar="NUMBER")
    parser.add_argument(
        "--reject", action="append", default=[], metavar="NUMBER", help="connected, then hung up"
    )
    parser.add_argument("--reply", action="append", default=[], metavar="NUMBER:S:TEXT")
    parser.add_argument("--no-sim", action="store_true")
    parser.add_argument("--sim-busy", type=float, metavar="S")
    parser.add_argument("--no-signal", action="store_true")
    parser.add_argument("--garbage", type=float, metavar="EVERY_S")
    parser.add_argument("--hang-after", type=float, metavar="S")
    parser.add_argument("--hang-for", type=float, metavar="S", help="default: for good")
    parser.add_argument(
        "--hang-cleared-by",
        choices=["cfun", "power"],
        help="what wakes a hung module: AT+CFUN=1,1, or only a power cycle (default)",
    )
    parser.add_argument(
        "--reset-file", metavar="PATH", help="touching this file reboots the module (RESET_N)"
    )
    parser.add_argument("--split-writes", action="store_true")
    parser.add_argument("--dtmf", choices=["quectel", "simcom", "none"])
    parser.add_argument("--simcom", action="store_true", help="+RXDTMF and +CLCC URCs")
    args = parser.parse_args(argv)
    try:
        scenario = _scenario_from_args(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"bad scenario: {exc}", file=sys.stderr)
        return 2

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event, ensure_ascii=False), flush=True)

    async def run() -> int:
        sim = ModemSim(args.port, scenario, link=args.link, on_event=show)
        try:
            await sim.start()
        except OSError as exc:
            print(f"cannot open the port: {exc}", file=sys.stderr)
            return 2
        print(f"modem simulator on {sim.device_path}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await sim.stop()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
