"""Closed-loop figures (闭环) from case records: what the district publishes (晒).

Pure arithmetic over :class:`Case` values; give it the cases of a period.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .model import Case, CaseState, RatingValue

__all__ = ["Figures", "Group", "figures", "percentile"]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: always a value that really occurred, which is
    easier to explain to staff than an interpolated one."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True, slots=True)
class Group:
    opened: int = 0
    resolved: int = 0
    unanswered: int = 0  # cases that raised the "unanswered" alarm, answered later or not
    cancelled: int = 0
    still_open: int = 0
    accept_median_s: float | None = None
    accept_p90_s: float | None = None
    resolve_median_s: float | None = None
    resolve_p90_s: float | None = None
    rated: int = 0
    satisfied: int = 0

    @property
    def satisfaction(self) -> float | None:
        """Share of thumbs up among rated cases (the latest rating of each)."""
        return None if not self.rated else self.satisfied / self.rated

    def to_dict(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "resolved": self.resolved,
            "unanswered": self.unanswered,
            "cancelled": self.cancelled,
            "still_open": self.still_open,
            "accept_median_s": self.accept_median_s,
            "accept_p90_s": self.accept_p90_s,
            "resolve_median_s": self.resolve_median_s,
            "resolve_p90_s": self.resolve_p90_s,
            "rated": self.rated,
            "satisfied": self.satisfied,
            "satisfaction": self.satisfaction,
        }


@dataclass(frozen=True, slots=True)
class Figures:
    total: Group
    per_person: dict[str, Group] = field(default_factory=dict)  # by who took the case
    per_grid: dict[str, Group] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            "per_person": {k: v.to_dict() for k, v in sorted(self.per_person.items())},
            "per_grid": {k: v.to_dict() for k, v in sorted(self.per_grid.items())},
        }


def _group(cases: list[Case]) -> Group:
    accept = [c.accepted_at - c.opened_at for c in cases if c.accepted_at is not None]
    resolve = [
        c.resolved_at - c.opened_at
        for c in cases
        if c.state is CaseState.RESOLVED and c.resolved_at is not None
    ]
    rated = [c for c in cases if c.rating is not None]
    return Group(
        opened=len(cases),
        resolved=sum(c.state is CaseState.RESOLVED for c in cases),
        unanswered=sum(c.alarmed_at is not None for c in cases),
        cancelled=sum(c.state is CaseState.CANCELLED for c in cases),
        still_open=sum(c.open for c in cases),
        accept_median_s=_median(accept),
        accept_p90_s=percentile(accept, 90),
        resolve_median_s=_median(resolve),
        resolve_p90_s=percentile(resolve, 90),
        rated=len(rated),
        satisfied=sum(c.rating is not None and c.rating.value is RatingValue.UP for c in rated),
    )


def figures(cases: Iterable[Case]) -> Figures:
    """Figures for all cases, per person who took them, and per grid.

    Each case counts once (by id, the latest version wins), so feeding it the
    store's history of case versions is safe.
    """
    latest: dict[str, Case] = {}
    for case in cases:
        latest[case.id] = case
    every = list(latest.values())
    by_person: dict[str, list[Case]] = {}
    by_grid: dict[str, list[Case]] = {}
    for case in every:
        person = case.resolved_by or case.accepted_by
        if person is not None:
            by_person.setdefault(person, []).append(case)
        by_grid.setdefault(case.grid or "(none)", []).append(case)
    return Figures(
        total=_group(every),
        per_person={k: _group(v) for k, v in by_person.items()},
        per_grid={k: _group(v) for k, v in by_grid.items()},
    )
