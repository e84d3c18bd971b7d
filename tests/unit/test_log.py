from __future__ import annotations

import pytest
import structlog

from gateway.log import RateLimiter


def test_repeated_warning_is_rate_limited_and_counted():
    now = [0.0]
    limiter = RateLimiter(window_s=60, clock=lambda: now[0])

    def log(event: str, key: str) -> dict[str, object] | None:
        try:
            return dict(limiter(None, "warning", {"event": event, "rate_key": key}))
        except structlog.DropEvent:
            return None

    assert log("frame rejected", "a") == {"event": "frame rejected"}
    for _ in range(9_999):
        assert log("frame rejected", "a") is None
    # Another caller's fault is not hidden by the first one's.
    assert log("frame rejected", "b") == {"event": "frame rejected"}
    now[0] = 61.0
    assert log("frame rejected", "a") == {"event": "frame rejected", "suppressed": 9_999}


def test_lines_without_rate_key_pass():
    limiter = RateLimiter()
    for _ in range(3):
        assert limiter(None, "info", {"event": "x"}) == {"event": "x"}


def test_memory_stays_bounded():
    limiter = RateLimiter()
    for i in range(25_000):
        limiter(None, "warning", {"event": "e", "rate_key": i})
    assert len(limiter._state) <= 10_001


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_names_and_phone_numbers_are_masked():
    from gateway.log import mask_personal

    out = mask_personal(None, "info", {
        "event": "sms from 13905641001 about case 1001-3",
        "resident": "王秀英",
        "phone": "+86 139 0564 1002",
        "device": 1001,
        "detail": "no answer from 15912345678",
    })
    assert out["event"] == "sms from 139****1001 about case 1001-3"
    assert out["resident"] == "王**"
    assert out["phone"] == "139****1002"
    assert out["detail"] == "no answer from 159****5678"
    assert out["device"] == 1001
