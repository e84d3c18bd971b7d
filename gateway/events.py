"""Typed events produced at the edge and consumed by the call desk.

Plain frozen dataclasses: pydantic stays at the boundaries, not in the core.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_protocol import Key

__all__ = ["CallerEvent", "HeartbeatReceived", "KeyPressed"]


@dataclass(frozen=True, slots=True)
class CallerEvent:
    """Something a caller sent, durably journalled before anyone acts on it.

    ``(device_id, counter)`` identifies the event for good: the caller never
    reuses a counter, and the journal refuses a second row for it.
    """

    device_id: int
    counter: int
    link: str  # which link it came in on, e.g. "serial:bus1" or "mqtt"
    received_at: float  # wall clock, Unix seconds
    wall_trusted: bool  # False while the clock is not synchronised


@dataclass(frozen=True, slots=True)
class KeyPressed(CallerEvent):
    key: Key


@dataclass(frozen=True, slots=True)
class HeartbeatReceived(CallerEvent):
    battery_mv: int
    battery_pct: int | None
    signal_dbm: int | None
    external_power: bool
    low_battery: bool
