from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter in the upper half: ``d/2 .. d``.

    Jitter keeps many gateways (or many callers) from retrying in lock-step
    after the same outage.
    """

    def __init__(self, minimum: float, maximum: float) -> None:
        self._min = minimum
        self._max = max(maximum, minimum)
        self._current = minimum

    def next(self) -> float:
        delay = self._current
        self._current = min(self._max, self._current * 2)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._current = self._min
