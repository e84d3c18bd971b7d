"""The worked examples in firmware_protocol/SPEC.md are checked against the codec.

Every ```frame block is decoded and compared with the field table that follows
it, byte by byte and value by value; the table is then turned back into a
message and re-encoded, which must give the same bytes.  A block whose
description line says ``rejected: `reason` `` must be rejected for that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import firmware_protocol as fp

from ..conftest import require_binary

SPEC = Path(fp.__file__).with_name("SPEC.md")

_SIZES = {
    "sync": 2,
    "version": 1,
    "type": 1,
    "device_id": 4,
    "counter": 4,
    "length": 1,
    "key": 1,
    "battery_mv": 2,
    "battery_pct": 1,
    "signal_dbm": 1,
    "flags": 1,
    "acked_counter": 4,
    "status": 1,
    "state": 1,
    "led_color": 1,
    "led_pattern": 1,
    "buzzer": 1,
    "hold_s": 2,
    "mac": 8,
    "crc": 2,
}
_HEAD = ["sync", "version", "type", "device_id", "counter", "length"]
_TAIL = ["mac", "crc"]
_PAYLOAD_FIELDS = {
    fp.MsgType.KEY: ["key"],
    fp.MsgType.HEARTBEAT: ["battery_mv", "battery_pct", "signal_dbm", "flags"],
    fp.MsgType.CALLER_ACK: ["acked_counter"],
    fp.MsgType.ACK: ["acked_counter", "status"],
    fp.MsgType.FEEDBACK: ["state", "led_color", "led_pattern", "buzzer", "hold_s"],
}


@dataclass(frozen=True)
class Row:
    offset: int
    field: str
    data: bytes
    value: str


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the opening fence, for messages
    description: str
    data: bytes
    rows: tuple[Row, ...]
    rejected: str | None  # the documented rejection reason, if any

    def __str__(self) -> str:
        return f"SPEC.md:{self.line} {self.description!r}"


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("`", "").strip())


def _parse_table(lines: list[str], start: int) -> tuple[Row, ...]:
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    table = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        table.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    if not table:
        return ()
    assert table[0][:4] == ["offset", "field", "bytes", "value"], f"table header {table[0]}"
    return tuple(Row(int(cells[0]), cells[1], _hex(cells[2]), cells[3]) for cells in table[2:])


def load_examples() -> tuple[bytes, list[Example]]:
    text = SPEC.read_text(encoding="utf-8")
    found = re.search(r"device key\s+`([0-9a-f]{32})`", text)
    assert found, "SPEC.md must state the examples' device key in backticks"
    key = bytes.fromhex(found.group(1))
    lines = text.splitlines()
    examples = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```frame":
            i += 1
            continue
        fence = i
        description = lines[i - 1].strip() if i else ""
        body = []
        i += 1
        while lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        rejected = re.search(r"rejected: `(\w+)`", description)
        examples.append(
            Example(
                line=fence + 1,
                description=description,
                data=_hex(" ".join(body)),
                rows=() if rejected else _parse_table(lines, i),
                rejected=rejected.group(1) if rejected else None,
            )
        )
    return key, examples


KEY, EXAMPLES = load_examples()
ACCEPTED = [e for e in EXAMPLES if e.rejected is None]
REJECTED = [e for e in EXAMPLES if e.rejected is not None]


def _decode(data: bytes) -> list[fp.Frame | fp.Rejected]:
    decoder = fp.FrameDecoder()
    items = decoder.feed(data)
    items.extend(decoder.flush())
    return items


def _values(frame: fp.Frame) -> dict[str, str]:
    """The frame's fields written the way the SPEC's tables write them."""
    msg = frame.message
    out = {
        "sync": "",
        "version": str(fp.VERSION),
        "type": frame.type.name,
        "device_id": str(frame.device_id),
        "counter": str(frame.counter),
        "length": str(frame.raw[12]),
        "mac": "",
        "crc": f"0x{int.from_bytes(frame.raw[-2:], 'big'):04X}",
    }
    if isinstance(msg, fp.KeyPress):
        out["key"] = msg.key.name
    elif isinstance(msg, fp.Heartbeat):
        out["battery_mv"] = str(msg.battery_mv)
        out["battery_pct"] = "unknown" if msg.battery_pct is None else str(msg.battery_pct)
        out["signal_dbm"] = "none" if msg.signal_dbm is None else str(msg.signal_dbm)
        flags = (1 if msg.external_power else 0) | (2 if msg.low_battery else 0)
        out["flags"] = f"0x{flags:02X}"
    elif isinstance(msg, fp.Ack):
        out["acked_counter"] = str(msg.acked_counter)
        out["status"] = msg.status.name
    elif isinstance(msg, fp.CallerAck):
        out["acked_counter"] = str(msg.acked_counter)
    elif isinstance(msg, fp.Feedback):
        out["state"] = msg.state.name
        out["led_color"] = msg.led_color.name
        out["led_pattern"] = msg.led_pattern.name
        out["buzzer"] = msg.buzzer.name
        out["hold_s"] = str(msg.hold_s)
    return out


def _message(v: dict[str, str]) -> fp.Message:
    """Build a message from a SPEC table's value column alone."""
    msg_type = fp.MsgType[v["type"]]
    if msg_type is fp.MsgType.KEY:
        return fp.KeyPress(fp.Key[v["key"]])
    if msg_type is fp.MsgType.HEARTBEAT:
        flags = int(v["flags"], 16)
        return fp.Heartbeat(
            battery_mv=int(v["battery_mv"]),
            battery_pct=None if v["battery_pct"] == "unknown" else int(v["battery_pct"]),
            signal_dbm=None if v["signal_dbm"] == "none" else int(v["signal_dbm"]),
            external_power=bool(flags & 1),
            low_battery=bool(flags & 2),
        )
    if msg_type is fp.MsgType.ACK:
        return fp.Ack(int(v["acked_counter"]), fp.AckStatus[v["status"]])
    if msg_type is fp.MsgType.CALLER_ACK:
        return fp.CallerAck(int(v["acked_counter"]))
    return fp.Feedback(
        state=fp.CallerState[v["state"]],
        led_color=fp.LedColor[v["led_color"]],
        led_pattern=fp.LedPattern[v["led_pattern"]],
        buzzer=fp.Buzzer[v["buzzer"]],
        hold_s=int(v["hold_s"]),
    )


def test_crc_check_value() -> None:
    assert fp.crc16(b"123456789") == 0x29B1
    assert fp.crc16(b"") == 0xFFFF


def test_spec_has_the_required_examples() -> None:
    assert bytes(range(16)) == KEY
    assert len(ACCEPTED) >= 4
    assert [e.rejected for e in REJECTED] == ["bad_crc"]
    for example in EXAMPLES:
        assert example.description, f"{example}: no description line right before the block"
    decoded = []
    for example in ACCEPTED:
        (frame,) = _decode(example.data)
        assert isinstance(frame, fp.Frame), example
        decoded.append((frame.type, frame.device_id, frame.counter, frame.message))
    # The examples the SPEC promises, held here so that a consistent but wrong edit
    # of a block and its table still fails.
    required = [
        (fp.MsgType.KEY, 1001, 1, fp.KeyPress(fp.Key.CALL)),
        (fp.MsgType.HEARTBEAT, 1001, 2, fp.Heartbeat(3000, 87, -71, False, False)),
        (fp.MsgType.ACK, 1001, 1, fp.Ack(1, fp.AckStatus.STORED)),
        (
            fp.MsgType.FEEDBACK,
            1001,
            2,
            fp.Feedback(
                fp.CallerState.HELP_COMING,
                fp.LedColor.GREEN,
                fp.LedPattern.STEADY,
                fp.Buzzer.SHORT,
                0,
            ),
        ),
    ]
    for item in required:
        assert item in decoded, f"SPEC.md lacks the example {item}"


@pytest.mark.parametrize("example", ACCEPTED, ids=str)
def test_example_decodes_to_its_table(example: Example) -> None:
    items = _decode(example.data)
    assert len(items) == 1, f"{example}: {items}"
    frame = items[0]
    assert isinstance(frame, fp.Frame), f"{example}: {frame}"
    assert frame.raw == example.data
    assert fp.verify_mac(frame, KEY), f"{example}: the MAC does not verify with the key"
    assert not fp.verify_mac(frame, bytes(16))
    assert fp.decode_frame(example.data) == frame

    # Fed one byte at a time, the same frame comes out.
    decoder = fp.FrameDecoder()
    trickled = [item for b in example.data for item in decoder.feed(bytes([b]))]
    assert trickled == [frame]

    # The table: the expected fields in order, contiguous, covering every byte.
    fields = [row.field for row in example.rows]
    assert fields == _HEAD + _PAYLOAD_FIELDS[frame.type] + _TAIL, example
    offset = 0
    for row in example.rows:
        assert row.offset == offset, f"{example}: {row.field} at offset {row.offset}"
        assert len(row.data) == _SIZES[row.field], f"{example}: size of {row.field}"
        assert example.data[offset : offset + len(row.data)] == row.data, (
            f"{example}: bytes of {row.field}"
        )
        offset += len(row.data)
    assert offset == len(example.data)
    assert example.rows[-2].data == frame.mac

    # The value column says what the codec decodes.
    documented = {row.field: row.value for row in example.rows}
    assert documented == _values(frame), example


@pytest.mark.parametrize("example", ACCEPTED, ids=str)
def test_table_reencodes_to_the_same_bytes(example: Example) -> None:
    v = {row.field: row.value for row in example.rows}
    data = fp.encode(_message(v), device_id=int(v["device_id"]), counter=int(v["counter"]), key=KEY)
    assert data == example.data, f"{example}: re-encoded as {data.hex(' ')}"


@pytest.mark.parametrize("example", REJECTED, ids=str)
def test_rejected_example(example: Example) -> None:
    result = fp.decode_frame(example.data)
    assert isinstance(result, fp.Rejected), example
    assert result.reason == example.rejected
    items = _decode(example.data)
    assert not [i for i in items if isinstance(i, fp.Frame)]
    assert items[0].reason == example.rejected
    if example.rejected == "bad_crc":
        # A damaged copy of an accepted example: one byte differs.
        assert any(
            len(good.data) == len(example.data)
            and sum(a != b for a, b in zip(good.data, example.data, strict=True)) == 1
            for good in ACCEPTED
        ), example


def _c_block(text: str) -> str:
    found = re.search(r"```c\n(.*?)```", text, re.S)
    assert found, "SPEC.md must hold a C reference implementation of the CRC"
    return found.group(1)


def test_c_reference_crc(tmp_path: Path) -> None:
    """The SPEC's C code compiles and agrees with the codec."""
    cc = shutil.which("cc") or shutil.which("clang") or require_binary("gcc", "gcc")
    main = r"""
#include <stdio.h>
int main(void)
{
    static uint8_t buf[4096];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    printf("%04X\n", crc16(buf, n));
    return 0;
}
"""
    source = tmp_path / "crc.c"
    source.write_text(_c_block(SPEC.read_text(encoding="utf-8")) + main, encoding="utf-8")
    exe = tmp_path / "crc"
    subprocess.run(
        [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(source)],
        check=True,
        capture_output=True,
    )
    inputs = [b"123456789"] + [e.data[2:-2] for e in EXAMPLES]
    for data in inputs:
        out = subprocess.run([str(exe)], input=data, check=True, capture_output=True).stdout
        assert int(out, 16) == fp.crc16(data), data.hex(" ")
