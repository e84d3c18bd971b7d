"""Keeping the daemon's resident memory small on a Pi (glibc only; elsewhere a no-op).

Start-up parses every resident from TOML into pydantic models and then keeps
only what the desk and the intake need: with 10,000 callers that is a peak of
about 14 MB of which 3 MB stays.  glibc keeps the freed pages unless asked.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

__all__ = ["limit_arenas", "trim"]

_M_ARENA_MAX = -8  # malloc.h


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (musl has no mallopt: no arenas to limit)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas() -> None:
    """One malloc arena for every thread; call before threads start.

    aiosqlite's worker thread would otherwise grow a heap of its own beside
    the main one.  ``MALLOC_ARENA_MAX`` in the environment still wins.
    """
    libc = _libc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, 1)


def trim() -> None:
    """Give the pages freed after loading the configuration back to the system."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
