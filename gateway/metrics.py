"""In-process counters and gauges with labels, named as Prometheus would name them."""

from __future__ import annotations

from collections import defaultdict

__all__ = ["Metrics"]

LabelKey = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._counters: defaultdict[str, defaultdict[LabelKey, float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self._gauges: defaultdict[str, dict[LabelKey, float]] = defaultdict(dict)

    @staticmethod
    def _key(labels: dict[str, str]) -> LabelKey:
        return tuple(sorted(labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[name][self._key(labels)] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[name][self._key(labels)] = value

    def get(self, name: str, **labels: str) -> float:
        """A counter's value for exactly these labels, or summed over all if none given."""
        series = self._gauges[name] if name in self._gauges else self._counters.get(name, {})
        if not labels:
            return sum(series.values())
        return series.get(self._key(labels), 0.0)

    def snapshot(self) -> dict[str, dict[LabelKey, float]]:
        out: dict[str, dict[LabelKey, float]] = {k: dict(v) for k, v in self._counters.items()}
        out.update({k: dict(v) for k, v in self._gauges.items()})
        return out
