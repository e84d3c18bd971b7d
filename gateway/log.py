"""Structured logging: JSON lines for the journal, readable lines on a terminal.

A fault on one caller (a chattering line, a forged frame every second) must
not bury everything else, so warnings and errors that repeat are rate-limited
per ``(event, rate_key)``: the first is logged, repeats within the window are
counted, and the next line after the window says how many were suppressed.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

__all__ = ["RateLimiter", "configure", "get_logger", "mask_personal"]

# Residents' and staff's phone numbers and names do not belong in a journal
# that IT staff paste into chat groups when asking for help.
_PHONE = re.compile(r"(?<!\d)(\+?86)?(1[3-9]\d)(\d{4})(\d{4})(?!\d)")
_NAME_KEYS = frozenset({"name", "resident", "person_name", "resident_name"})
_PHONE_KEYS = frozenset({"phone", "number", "sender", "caller_number"})


def _mask_name(value: str) -> str:
    return value[:1] + "*" * max(1, len(value) - 1) if value else value


def _mask_phone(value: str) -> str:
    digits = re.sub(r"\D", "", value)
    if len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]  # China's country code in front of a mobile number
    if len(digits) <= 7:
        return "*" * len(digits)
    return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]


def mask_personal(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: mask names and phone numbers before anything is written."""
    for key, value in list(event_dict.items()):
        if not isinstance(value, str):
            continue
        if key in _NAME_KEYS:
            event_dict[key] = _mask_name(value)
        elif key in _PHONE_KEYS:
            event_dict[key] = _mask_phone(value)
        elif _PHONE.search(value):
            event_dict[key] = _PHONE.sub(lambda m: f"{m.group(2)}****{m.group(4)}", value)
    return event_dict


class RateLimiter:
    """A structlog processor.  Add ``rate_key=...`` to a log call to limit it."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._window = window_s
        self._clock = clock
        self._state: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        rate_key = event_dict.pop("rate_key", None)
        if rate_key is None:
            return event_dict
        key = (str(event_dict.get("event")), str(rate_key))
        now = self._clock()
        first, suppressed = self._state.get(key, (-1e18, 0))
        if now - first < self._window:
            self._state[key] = (first, suppressed + 1)
            raise structlog.DropEvent
        if suppressed:
            event_dict["suppressed"] = suppressed
        self._state[key] = (now, 0)
        if len(self._state) > 10_000:
            # Bounded: forget the oldest entries rather than grow without limit.
            for stale in sorted(self._state, key=lambda k: self._state[k][0])[:5_000]:
                del self._state[stale]
        return event_dict


def configure(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: Any = None,
) -> None:
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            RateLimiter(),
            mask_personal,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
