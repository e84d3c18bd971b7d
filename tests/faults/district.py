"""What the fault campaign checks at the district's end: the gateway's journal
and outbox against the reference central store's database.

The central store keeps two things per village (``simulators/central_store.py``):
every outbox record, keyed by (village, gateway database, outbox id), and the
newest version of each case.  A key press leaves its mark there as follows
(the desk's rules, ``gateway/desk/desk.py``), and nothing else leaves these:

- a green press with no open case opens case ``"<device>-<counter>"``;
- a green press with a case open is a ``green_again`` transition of that case;
- a red press with a case open is a ``red`` transition of it (the first red
  within the cancel window cancels the case); with none open it leaves no mark;
- a thumbs press, with no resolved case to rate (nobody answers in these
  tests), is a ``general_feedback`` record naming the device and counter.

A caller's presses are handled in counter order (the next is sent only when
the last is acknowledged, and acknowledged only when committed), so walking
each caller's presses in that order says exactly which marks the district
must hold: a press lost or counted twice on the way shows up as a count that
is off by one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_protocol import Key

KEY_NAMES = {int(Key.CALL): "call", int(Key.HANGUP): "hangup", int(Key.UP): "up"}
KEY_NAMES[int(Key.DOWN)] = "down"


@dataclass(frozen=True, order=True)
class Press:
    device: int
    counter: int
    key: str  # "call" | "hangup" | "up" | "down"


def sync_section(port: int, client_id: str) -> str:
    """A ``[sync]`` section with timings short enough for a test."""
    return (
        f'\n[sync]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "{client_id}"\n'
        "ack_timeout_s = 2.0\nretry_min_s = 0.1\nretry_max_s = 0.5\npoll_interval_s = 0.1\n"
    )


def read_press_log(path: Path) -> list[dict[str, Any]]:
    """What ``simulators.caller --many --press-log`` wrote: one press per line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def acked_presses(log: Iterable[dict[str, Any]]) -> list[Press]:
    return sorted(Press(p["device"], p["counter"], p["key"]) for p in log if p["acked"])


def _ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def journal_presses(db: Path) -> list[Press]:
    with _ro(db) as conn:
        rows = conn.execute(
            "SELECT device_id, counter, key FROM events WHERE kind = 'key' ORDER BY id"
        ).fetchall()
    return [Press(d, c, KEY_NAMES[k]) for d, c, k in rows]


def unacked(db: Path) -> int:
    with _ro(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0])


def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout} s")
        time.sleep(0.1)


@dataclass
class GatewaySide:
    store_id: str
    outbox: dict[int, tuple[str, str | None, dict[str, Any]]]  # id → kind, case id, payload
    cases: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, db: Path) -> GatewaySide:
        with _ro(db) as conn:
            store_id = conn.execute("SELECT value FROM sync_state WHERE key = 'store_id'")
            sid = str(store_id.fetchone()[0])
            outbox = {
                int(i): (k, c, json.loads(p))
                for i, k, c, p in conn.execute("SELECT id, kind, case_id, payload FROM outbox")
            }
            cases = {cid: json.loads(d) for cid, d in conn.execute("SELECT id, data FROM cases")}
        return cls(sid, outbox, cases)


@dataclass
class DistrictSide:
    # (store, outbox id, kind, case id, payload), in the order they were stored
    records: list[tuple[str, int, str, str | None, dict[str, Any]]]
    cases: dict[str, tuple[str, int, dict[str, Any]]]  # case id → store, outbox id, data

    @classmethod
    def read(cls, central_db: Path, village: str) -> DistrictSide:
        with _ro(central_db) as conn:
            records = [
                (s, int(i), k, c, json.loads(p))
                for s, i, k, c, p in conn.execute(
                    "SELECT store, outbox_id, kind, case_id, payload FROM records "
                    "WHERE village = ? ORDER BY seq",
                    (village,),
                )
            ]
            cases = {
                cid: (s, int(i), json.loads(d))
                for cid, s, i, d in conn.execute(
                    "SELECT case_id, store, outbox_id, data FROM cases WHERE village = ?",
                    (village,),
                )
            }
        return cls(records, cases)


def check_records_exactly_once(gw: GatewaySide, district: DistrictSide) -> None:
    """Every outbox record is at the district once, as the gateway made it;
    each case's records were stored in the order the gateway made them, and
    the district's case is the gateway's newest version of it."""
    assert {r[0] for r in district.records} <= {gw.store_id}, "records of another database"
    ids = [r[1] for r in district.records]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    assert not dup, f"records stored twice at the district: {dup[:20]}"
    missing = sorted(set(gw.outbox) - set(ids))
    assert not missing, f"{len(missing)} outbox records never reached the district: {missing[:20]}"
    assert set(ids) == set(gw.outbox), "the district holds records the gateway never made"
    last: dict[str, int] = {}
    for _store, oid, kind, case_id, payload in district.records:
        assert (kind, case_id, payload) == gw.outbox[oid], f"record {oid} changed on the way"
        if case_id is not None:
            assert oid > last.get(case_id, 0), f"case {case_id}: record {oid} out of order"
            last[case_id] = oid
    newest = {
        case_id: oid for oid, (kind, case_id, _p) in gw.outbox.items() if kind == "case" and case_id
    }
    assert set(district.cases) == set(gw.cases) == set(newest), "cases missing at either end"
    for case_id, (_store, oid, data) in district.cases.items():
        assert oid == newest[case_id], f"case {case_id} is not at its newest version"
        assert data == gw.cases[case_id], f"case {case_id} differs at the district"


def check_presses_at_district(presses: Iterable[Press], district: DistrictSide) -> None:
    """Each press leaves exactly the mark the desk's rules give it (module doc)."""
    by_device: dict[int, list[Press]] = defaultdict(list)
    for p in sorted(presses):
        by_device[p.device].append(p)
    cases: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for case_id, (_s, _oid, data) in district.cases.items():
        device, counter = int(data["device_id"]), int(data["counter"])
        assert case_id == f"{device}-{counter}", case_id
        assert data["state"] != "resolved", "nobody answers here; the rules below assume it"
        cases[device][counter] = data
    feedback = Counter(
        (int(p["device_id"]), int(p["counter"]))
        for _s, _oid, kind, _c, p in district.records
        if kind == "general_feedback"
    )
    expected_feedback: Counter[tuple[int, int]] = Counter()
    for device in by_device.keys() | cases.keys():
        openers = cases[device]
        greens = {p.counter for p in by_device[device] if p.key == "call"}
        strays = sorted(set(openers) - greens)
        assert not strays, f"caller {device}: cases {strays} opened by no green press"
        case: dict[str, Any] | None = None
        closed = False  # the case was cancelled; the next green must open a new one
        again: Counter[str] = Counter()
        reds: Counter[str] = Counter()
        for p in by_device[device]:
            if p.counter in openers:
                case, closed = openers[p.counter], False
                continue
            if p.key == "call":
                assert case is not None, f"green press {p} made no case at the district"
                assert not closed, f"green press {p} after a cancel made no case at the district"
                again[case["id"]] += 1
            elif p.key == "hangup":
                if case is not None and not closed:
                    reds[case["id"]] += 1
                    closed = case["state"] == "cancelled"
            else:
                expected_feedback[(p.device, p.counter)] += 1
        for data in openers.values():
            causes = Counter(t["cause"] for t in data["transitions"])
            assert causes["green_again"] == again[data["id"]], (
                f"case {data['id']}: {causes['green_again']} repeated greens at the "
                f"district, {again[data['id']]} pressed"
            )
            assert causes["red"] == reds[data["id"]], (
                f"case {data['id']}: {causes['red']} reds at the district, "
                f"{reds[data['id']]} pressed while it was open"
            )
            if data["state"] == "cancelled":
                assert data["transitions"][-1]["cause"] == "red", data["id"]
    assert feedback == expected_feedback, (
        "thumbs presses at the district differ: "
        f"extra {sorted((feedback - expected_feedback).items())[:10]}, "
        f"missing {sorted((expected_feedback - feedback).items())[:10]}"
    )
