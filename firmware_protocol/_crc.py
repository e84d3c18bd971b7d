"""CRC-16/IBM-3740 (also known as CRC-16/CCITT-FALSE).

Parameters: width 16, poly 0x1021, init 0xFFFF, refin false, refout false,
xorout 0x0000, check ("123456789") 0x29B1.  A table-driven form is used
because it is what a small microcontroller would also use.
"""

from __future__ import annotations

__all__ = ["crc16"]


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _make_table()


def crc16(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc
