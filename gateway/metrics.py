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
        self._histograms: dict[str, tuple[list[list[float]], list[float]]] = {}

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

    def observe(self, name: str, value: float, buckets: tuple[float, ...]) -> None:
        """Add ``value`` to a histogram (bucket counts, sum and count)."""
        hist = self._histograms.get(name)
        if hist is None:
            hist = self._histograms[name] = ([[b, 0] for b in buckets], [0.0, 0])
        for bucket in hist[0]:
            if value <= bucket[0]:
                bucket[1] += 1
                break
        hist[1][0] += value
        hist[1][1] += 1

    def histograms(self) -> dict[str, tuple[list[tuple[float, int]], float, int]]:
        return {
            name: ([(b, n) for b, n in buckets], total[0], int(total[1]))
            for name, (buckets, total) in self._histograms.items()
        }

    def gauge_names(self) -> set[str]:
        return set(self._gauges)

    def snapshot(self) -> dict[str, dict[LabelKey, float]]:
        out: dict[str, dict[LabelKey, float]] = {k: dict(v) for k, v in self._counters.items()}
        out.update({k: dict(v) for k, v in self._gauges.items()})
        return out
