"""Replay protection and duplicate detection.  Pure: the caller supplies all state."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import Enum

from ._frames import MAC_LEN

__all__ = ["ReplayGuard", "Verdict"]

# One remembered frame: its counter and MAC.  A device's recent frames are one
# bytes object of these, oldest first: a village of 10,000 callers costs about
# 80 bytes each instead of the ~900 of a small dict per caller.
_ENTRY = struct.Struct(f">I{MAC_LEN}s")


def _mac_of(recent: bytes, counter: int) -> bytes | None:
    """The MAC remembered for ``counter`` in a device's packed recent frames."""
    for seen_counter, seen_mac in _ENTRY.iter_unpack(recent):
        if seen_counter == counter:
            return seen_mac
    return None


class Verdict(Enum):
    NEW = "new"  # higher than anything accepted from this device
    DUPLICATE = "duplicate"  # a retransmission of a frame already accepted
    REPLAY = "replay"  # an old counter, or a known counter with other content
    # Below the mark but inside the late window, and not among the recently
    # accepted frames: new if the receiver's own record has no frame with this
    # counter, a duplicate if it has this one, a replay otherwise.
    LATE = "late"


class ReplayGuard:
    """Per-device high-water mark of accepted frame counters.

    A retransmission repeats a frame byte for byte, so it carries the same
    counter and MAC as an accepted frame: it is a DUPLICATE and is acknowledged
    again without a second event.  Any other frame whose counter is not above
    the high-water mark is a REPLAY.  The last ``window`` accepted frames of
    each device are remembered to tell the two apart.

    With ``late_window`` > 0, a counter up to that far below the mark is LATE
    rather than a replay: a frame lost on its first transmission and repeated
    after a later frame got through.  Only a receiver that keeps a record of
    every accepted counter (the gateway's journal) can accept it safely.
    """

    def __init__(self, window: int = 16, late_window: int = 0) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if late_window < 0:
            raise ValueError("late_window must not be negative")
        self._window = window
        self._late = late_window
        self._high: dict[int, int] = {}
        self._recent: dict[int, bytes] = {}

    def high_water(self, device_id: int) -> int:
        return self._high.get(device_id, 0)

    def check(self, device_id: int, counter: int, mac: bytes) -> Verdict:
        seen = _mac_of(self._recent.get(device_id, b""), counter)
        if seen is not None:
            return Verdict.DUPLICATE if seen == mac else Verdict.REPLAY
        high = self._high.get(device_id, 0)
        if counter > high:
            return Verdict.NEW
        if counter > high - self._late:
            return Verdict.LATE
        return Verdict.REPLAY

    def accept(self, device_id: int, counter: int, mac: bytes) -> None:
        """Record a frame as accepted (call once it is durably stored)."""
        if counter > self._high.get(device_id, 0):
            self._high[device_id] = counter
        if len(mac) != MAC_LEN:
            raise ValueError(f"a MAC is {MAC_LEN} bytes, got {len(mac)}")
        recent = self._recent.get(device_id, b"")
        if _mac_of(recent, counter) is not None:
            recent = b"".join(
                _ENTRY.pack(c, m) for c, m in _ENTRY.iter_unpack(recent) if c != counter
            )
        self._recent[device_id] = (recent + _ENTRY.pack(counter, mac))[
            -self._window * _ENTRY.size :
        ]

    def load(self, device_id: int, high_water: int, recent: Iterable[tuple[int, bytes]]) -> None:
        """Restore a device's state, e.g. from the journal at start-up."""
        self._high[device_id] = max(high_water, self._high.get(device_id, 0))
        for counter, mac in sorted(recent):
            self.accept(device_id, counter, mac)

    def forget(self, device_id: int) -> None:
        """Drop a device's state: its counter restarts (a replaced caller)."""
        self._high.pop(device_id, None)
        self._recent.pop(device_id, None)
