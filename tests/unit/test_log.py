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


def _run(limiter: RateLimiter, method: str, **fields: object) -> dict[str, object] | None:
    try:
        return dict(limiter(None, method, dict(fields)))
    except structlog.DropEvent:
        return None


def test_warnings_without_rate_key_are_limited_per_event_and_whose():
    now = [0.0]
    limiter = RateLimiter(window_s=60, clock=lambda: now[0], burst=3)
    passed = [_run(limiter, "warning", event="port gone", port="/dev/ttyUSB0") for _ in range(50)]
    assert sum(p is not None for p in passed) == 3
    # The same warning about another port is not hidden by the first one's flood.
    assert _run(limiter, "warning", event="port gone", port="/dev/ttyUSB1") is not None
    assert _run(limiter, "error", event="other trouble", port="/dev/ttyUSB0") is not None
    now[0] = 60.5
    assert _run(limiter, "warning", event="port gone", port="/dev/ttyUSB0") == {
        "event": "port gone",
        "port": "/dev/ttyUSB0",
        "suppressed": 47,
    }


def test_info_lines_are_the_record_and_never_dropped():
    limiter = RateLimiter(window_s=60, clock=lambda: 0.0, burst=1)
    for _ in range(100):
        assert _run(limiter, "info", event="key press stored", device=1001) is not None


def test_json_lines_to_the_journal_carry_their_priority(tmp_path, monkeypatch):
    import json
    import os

    from gateway.log import configure, get_logger, is_journal

    path = tmp_path / "journal"
    with path.open("w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert is_journal(stream)
        configure("json", "info", stream=stream)
        get_logger("t").warning("serial port cannot be opened", port="/dev/ttyUSB0")
        get_logger("t").info("gateway ready")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<6>"]
    assert json.loads(lines[0][3:])["event"] == "serial port cannot be opened"


def test_json_lines_elsewhere_are_plain_json(tmp_path, monkeypatch):
    import json

    from gateway.log import configure, get_logger

    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # someone else's journal stream
    path = tmp_path / "log"
    with path.open("w", encoding="utf-8") as stream:
        configure("json", "info", stream=stream)
        get_logger("t").error("disk full")
    assert json.loads(path.read_text(encoding="utf-8"))["level"] == "error"
