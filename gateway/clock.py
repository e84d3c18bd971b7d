"""Wall-clock trust.  A Raspberry Pi has no real-time clock: after a power cut
its time is wrong until NTP corrects it, so every record carries a flag saying
whether the wall clock could be trusted when it was written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Literal

__all__ = ["WallClock"]

_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised
_TIMEX_SIZE = 512  # larger than struct timex on every Linux ABI


def _kernel_says_synchronised() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(_TIMEX_SIZE)  # modes = 0: read only
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return False
    return state not in (-1, _TIME_ERROR)


class WallClock:
    def __init__(self, trust: Literal["auto", "always", "never"] = "auto") -> None:
        self._trust = trust
        self._checked_at = -1e9
        self._cached = False

    def now(self) -> float:
        return time.time()

    def trusted(self) -> bool:
        if self._trust != "auto":
            return self._trust == "always"
        mono = time.monotonic()
        # The syscall is cheap, but presses can come in bursts: ask once a second.
        if mono - self._checked_at >= 1.0:
            self._cached = _kernel_says_synchronised()
            self._checked_at = mono
        return self._cached
