"""Structured logging: JSON lines for the journal, readable lines on a terminal.

A fault on one caller (a chattering line, a forged frame every second) must
not bury everything else, so warnings and errors that repeat are rate-limited
(see RateLimiter): repeats within the window are counted, and the next line
after the window says how many were suppressed.  Under systemd each JSON
line starts with its syslog priority, so ``journalctl -p warning`` filters.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

__all__ = ["RateLimiter", "configure", "get_logger", "is_journal", "mask_personal"]

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


# Fields that say whose fault a line is about: one chattering caller must
# not use up the budget of the same warning about another caller.
_IDENTITY_KEYS = ("device", "device_id", "caller", "person", "link", "port", "modem", "channel")
_LIMITED_LEVELS = frozenset({"warning", "warn", "error", "critical", "exception"})


class RateLimiter:
    """A structlog processor that keeps a repeated warning from flooding the journal.

    With ``rate_key=...`` a line is logged once per window for that key.  Every
    other warning or error is limited per ``(event, whose)``, where *whose* is
    the first identity field the line carries (device, person, link, ...):
    the first ``burst`` lines in a window pass, the rest are counted, and the
    next line logged after the window says how many were suppressed.  Info
    lines (a press stored, a person notified) are the record of what happened
    and are never dropped.
    """

    def __init__(
        self,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        burst: int = 10,
    ):
        self._window = window_s
        self._clock = clock
        self._burst = burst
        # key -> (window start, lines logged in it, lines suppressed since last logged)
        self._state: dict[tuple[str, str], tuple[float, int, int]] = {}

    def __call__(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        rate_key = event_dict.pop("rate_key", None)
        if rate_key is not None:
            key, allowed = (str(event_dict.get("event")), f"key:{rate_key}"), 1
        elif method in _LIMITED_LEVELS:
            whose = next((f"{k}={event_dict[k]}" for k in _IDENTITY_KEYS if k in event_dict), "")
            key, allowed = (str(event_dict.get("event")), whose), self._burst
        else:
            return event_dict
        now = self._clock()
        start, logged, suppressed = self._state.get(key, (-1e18, 0, 0))
        if now - start >= self._window:
            start, logged = now, 0
        if logged >= allowed:
            self._state[key] = (start, logged, suppressed + 1)
            raise structlog.DropEvent
        if suppressed:
            event_dict["suppressed"] = suppressed
        self._state[key] = (start, logged + 1, 0)
        if len(self._state) > 10_000:
            # Bounded: forget the oldest entries rather than grow without limit.
            for stale in sorted(self._state, key=lambda k: self._state[k][0])[:5_000]:
                del self._state[stale]
        return event_dict


# syslog priorities; journald reads a "<N>" line prefix on a service's
# stdout/stderr as the line's priority, so `journalctl -p warning` works.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


class _PrefixedJson:
    """Render JSON and put the journal's priority prefix in front of it."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(ensure_ascii=False)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        return f"<{_PRIORITY.get(method, 6)}>{self._json(logger, method, event_dict)}"


def is_journal(stream: Any) -> bool:
    """Whether *stream* is connected to the systemd journal (see systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: Any = None,
) -> None:
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    elif is_journal(stream):
        renderer = _PrefixedJson()
    else:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
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
