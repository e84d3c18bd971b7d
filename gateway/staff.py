"""Commands for village IT staff: status, roster, cases, test-call.

They read the configuration and the gateway's database (read-only) and the
status file the daemon keeps beside it, so they work the same whether the
daemon runs or not, and say which it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
import time
from typing import Any

from .config import ConfigError, Loaded, load
from .desk import Case, case_from_dict
from .status import STALE_AFTER_S, process_alive, read_status, status_path, table

__all__ = ["cmd_cases", "cmd_roster", "cmd_status", "cmd_test_call"]

_WEEKDAYS = "一二三四五六日"


def _load(args: argparse.Namespace) -> Loaded | None:
    try:
        return load(args.config)
    except ConfigError as exc:
        print("the configuration is not valid (run check-config):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def _db(loaded: Loaded) -> sqlite3.Connection | None:
    path = loaded.gateway.store.path
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
    except sqlite3.Error as exc:
        raise SystemExit(f"cannot read {path}: {exc} (try with sudo)") from None
    return conn


def _local(loaded: Loaded, ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, loaded.village.roster.zone).strftime("%m-%d %H:%M:%S")


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _who(loaded: Loaded, person_id: str | None) -> str:
    if person_id is None:
        return "-"
    person = loaded.village.people.get(person_id)
    return f"{person.name}" if person else person_id


def _scalar(conn: sqlite3.Connection | None, sql: str, *args: object) -> Any:
    if conn is None:
        return None
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.OperationalError:
        return None  # an older schema: the figure does not exist yet
    return row[0] if row else None


# -- status ------------------------------------------------------------------------------


def _status_data(loaded: Loaded) -> dict[str, Any]:
    now = time.time()
    status = read_status(status_path(loaded.gateway.store.path))
    running = bool(
        status
        and not status.get("stopped_at")
        and process_alive(int(status.get("pid", 0)))
        and now - float(status.get("updated_at", 0)) < STALE_AFTER_S
    )
    conn = _db(loaded)
    village = loaded.village
    on_duty = [d.person for d in village.roster.on_duty(now)]
    # The next change of duty within a day, found minute by minute.
    next_change: dict[str, Any] | None = None
    base = now - now % 60
    for minute in range(1, 24 * 60 + 1):
        later = [d.person for d in village.roster.on_duty(base + minute * 60)]
        if later != on_duty:
            next_change = {"at": base + minute * 60, "on_duty": later}
            break
    open_cases = []
    low_battery: list[int] = []
    offline: list[int] = []
    if conn is not None:
        for row in conn.execute("SELECT data FROM cases WHERE open = 1 ORDER BY opened_at"):
            open_cases.append(case_from_dict(json.loads(row[0])))
        for row in conn.execute("SELECT device_id, kind FROM notices"):
            (low_battery if row["kind"] == "low_battery" else offline).append(row["device_id"])
    return {
        "running": running,
        "pid": status.get("pid") if status else None,
        "updated_at": status.get("updated_at") if status else None,
        "started_at": status.get("started_at") if status else None,
        "links": status.get("links", {}) if status else {},
        "callers": len(loaded.residents.caller),
        "callers_heard": status.get("callers_heard") if status else None,
        "callers_offline": sorted(offline),
        "callers_low_battery": sorted(low_battery),
        "open_cases": [
            {
                "id": c.id,
                "state": c.state.value,
                "device": c.device_id,
                "resident": loaded.residents.by_id().get(c.device_id).resident  # type: ignore[union-attr]
                if c.device_id in loaded.residents.by_id()
                else "?",
                "waiting_for": c.current,
                "accepted_by": c.accepted_by,
                "opened_at": c.opened_at,
            }
            for c in open_cases
        ],
        "on_duty": on_duty,
        "next_change": next_change,
        "backlog_to_district": _scalar(conn, "SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL"),
        "oldest_unsent_at": _scalar(
            conn, "SELECT MIN(created_at) FROM outbox WHERE acked_at IS NULL"
        ),
        "last_sync_at": _scalar(conn, "SELECT MAX(acked_at) FROM outbox"),
    }


def cmd_status(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 1
    data = _status_data(loaded)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return 0 if data["running"] else 3
    now = time.time()
    name = loaded.gateway.village.name or loaded.gateway.village.id
    if data["running"]:
        print(
            f"{name}: gateway RUNNING (pid {data['pid']}, "
            f"since {_local(loaded, data['started_at'])})"
        )
    elif data["updated_at"]:
        print(
            f"{name}: gateway NOT RUNNING (last seen {_ago(now - data['updated_at'])}; "
            "check: systemctl status onetouch-gateway)"
        )
    else:
        print(f"{name}: gateway NOT RUNNING (it has not run with this configuration)")
    if data["links"]:
        print(
            "links:    "
            + ", ".join(f"{n} {'up' if up else 'DOWN'}" for n, up in data["links"].items())
        )
    heard = data["callers_heard"]
    print(
        f"callers:  {data['callers']} registered"
        + (f", {heard} heard within the allowance" if heard is not None else "")
        + f", {len(data['callers_offline'])} offline"
        + f", {len(data['callers_low_battery'])} low battery"
    )
    for label, ids in (
        ("offline", data["callers_offline"]),
        ("low battery", data["callers_low_battery"]),
    ):
        for d in ids:
            c = loaded.residents.by_id().get(d)
            print(
                f"          {label}: caller {d} {c.resident if c else ''} "
                f"{c.address if c else ''}".rstrip()
            )
    print("on duty:  " + (", ".join(_who(loaded, p) for p in data["on_duty"]) or "NOBODY"))
    if data["next_change"]:
        nc = data["next_change"]
        print(
            f"next:     from {_local(loaded, nc['at'])}: "
            + (", ".join(_who(loaded, p) for p in nc["on_duty"]) or "NOBODY")
        )
    print(f"open cases: {len(data['open_cases'])}")
    if data["open_cases"]:
        print(
            table(
                ["case", "resident", "state", "opened", "waiting for / taken by"],
                [
                    [
                        c["id"],
                        c["resident"],
                        c["state"],
                        _local(loaded, c["opened_at"]),
                        _who(loaded, c["accepted_by"] or c["waiting_for"]),
                    ]
                    for c in data["open_cases"]
                ],
            )
        )
    backlog = data["backlog_to_district"]
    if backlog is not None:
        line = f"district: {backlog} record(s) waiting to be sent"
        if data["oldest_unsent_at"]:
            line += f", oldest from {_ago(now - data['oldest_unsent_at'])}"
        line += "; last sync " + (
            _ago(now - data["last_sync_at"]) if data["last_sync_at"] else "never"
        )
        print(line)
    return 0 if data["running"] else 3


# -- roster ------------------------------------------------------------------------------


def _roster_rows(loaded: Loaded, days: int) -> list[dict[str, Any]]:
    roster = loaded.village.roster
    zone = roster.zone
    start = dt.datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    rows: list[dict[str, Any]] = []
    for day in range(days):
        date = (start + dt.timedelta(days=day)).date()
        segment_start, current = 0, None
        for minute in range(24 * 60 + 1):
            if minute < 24 * 60:
                wall = dt.datetime.combine(date, dt.time(minute // 60, minute % 60))
                duty = tuple(d.person for d in roster.on_duty_local(wall))
            else:
                duty = None
            if minute == 0:
                current = duty
                continue
            if duty != current:
                rows.append(
                    {
                        "date": date.isoformat(),
                        "weekday": _WEEKDAYS[date.weekday()],
                        "from": f"{segment_start // 60:02d}:{segment_start % 60:02d}",
                        "to": f"{minute // 60:02d}:{minute % 60:02d}",
                        "on_duty": list(current or ()),
                    }
                )
                segment_start, current = minute, duty
    return rows


def cmd_roster(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 1
    rows = _roster_rows(loaded, args.days)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    print(
        f"on duty, next {args.days} days ({loaded.village.roster.timezone}; "
        "first named answers first)"
    )
    print(
        table(
            ["date", "day", "from", "to", "on duty"],
            [
                [
                    r["date"],
                    f"周{r['weekday']}",
                    r["from"],
                    r["to"],
                    "、".join(_who(loaded, p) for p in r["on_duty"]) or "NOBODY",
                ]
                for r in rows
            ],
        )
    )
    return 0


# -- cases -------------------------------------------------------------------------------


def _case_story(loaded: Loaded, conn: sqlite3.Connection, case: Case) -> dict[str, Any]:
    notes = [
        dict(r)
        for r in conn.execute(
            "SELECT at, person_id, kind, channel, outcome, detail FROM notifications "
            "WHERE case_id = ? ORDER BY id",
            (case.id,),
        )
    ]
    story = [
        {
            "at": t.at,
            "what": f"{t.from_state.value if t.from_state else '-'} -> {t.to_state.value}",
            "why": t.cause,
            "detail": t.detail,
        }
        for t in case.transitions
    ]
    story += [
        {
            "at": n["at"],
            "what": f"{n['kind']} to {_who(loaded, n['person_id'])} by {n['channel']}",
            "why": n["outcome"],
            "detail": n["detail"],
        }
        for n in notes
    ]
    story.sort(key=lambda s: s["at"])
    return {
        "id": case.id,
        "state": case.state.value,
        "story": story,
        "ratings": [r.value.value for r in case.ratings],
    }


def cmd_cases(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 1
    conn = _db(loaded)
    if conn is None:
        print("no database yet: the gateway has not run with this configuration")
        return 0
    residents = loaded.residents.by_id()
    if args.case:
        row = conn.execute("SELECT data FROM cases WHERE id = ?", (args.case,)).fetchone()
        if row is None:
            print(f"no case {args.case}", file=sys.stderr)
            return 1
        story = _case_story(loaded, conn, case_from_dict(json.loads(row[0])))
        if args.json:
            print(json.dumps(story, ensure_ascii=False, indent=2))
            return 0
        print(f"case {story['id']} ({story['state']})")
        print(
            table(
                ["time", "what", "why", "detail"],
                [
                    [_local(loaded, s["at"]), s["what"], s["why"], s["detail"] or ""]
                    for s in story["story"]
                ],
            )
        )
        return 0
    sql = "SELECT data FROM cases"
    if args.open:
        sql += " WHERE open = 1"
    sql += " ORDER BY opened_at DESC LIMIT ?"
    cases = [case_from_dict(json.loads(r[0])) for r in conn.execute(sql, (args.limit,))]
    if args.json:
        print(
            json.dumps([_case_story(loaded, conn, c) for c in cases], ensure_ascii=False, indent=2)
        )
        return 0
    if not cases:
        print("no open cases" if args.open else "no cases yet")
        return 0
    print(
        table(
            ["case", "resident", "address", "state", "opened", "taken by", "resolved", "rating"],
            [
                [
                    c.id,
                    residents[c.device_id].resident if c.device_id in residents else "?",
                    residents[c.device_id].address if c.device_id in residents else "",
                    c.state.value + (" (urgent)" if c.urgent else ""),
                    _local(loaded, c.opened_at),
                    _who(loaded, c.accepted_by),
                    _local(loaded, c.resolved_at),
                    c.rating.value.value if c.rating else "",
                ]
                for c in cases
            ],
        )
    )
    print("\nthe story of one case:  onetouch-gateway cases --case ID")
    return 0


# -- test-call ---------------------------------------------------------------------------


def cmd_test_call(args: argparse.Namespace) -> int:
    """Watch a real press on a real caller go through every step."""
    loaded = _load(args)
    if loaded is None:
        return 1
    caller = loaded.residents.by_id().get(args.caller)
    if caller is None:
        print(f"caller {args.caller} is not in {loaded.gateway.residents_path}", file=sys.stderr)
        return 1
    data = _status_data(loaded)
    if not data["running"]:
        print(
            "the gateway is not running: start it first (systemctl start onetouch-gateway)",
            file=sys.stderr,
        )
        return 1
    started = time.time()
    print(f"TEST CALL for caller {caller.id} ({caller.resident}, {caller.address}).")
    print(f"Press the GREEN key on that caller now. Waiting up to {args.timeout:.0f} s ...")
    deadline = started + args.timeout
    seen: set[str] = set()
    case_id: str | None = None

    def step(key: str, text: str) -> None:
        if key not in seen:
            seen.add(key)
            print(f"  [{time.time() - started:6.1f} s] {text}", flush=True)

    while time.time() < deadline:
        conn = _db(loaded)
        if conn is not None:
            row = conn.execute(
                "SELECT counter, received_at FROM events WHERE device_id = ? AND kind = 'key' "
                "AND key = 1 AND received_at >= ? ORDER BY id LIMIT 1",
                (caller.id, started - 1),
            ).fetchone()
            if row is not None:
                step("press", "green press received, stored and acknowledged to the caller")
                case_id = f"{caller.id}-{row['counter']}"
            if case_id is not None:
                crow = conn.execute("SELECT data FROM cases WHERE id = ?", (case_id,)).fetchone()
                case = case_from_dict(json.loads(crow[0])) if crow else None
                if case is None:
                    # A press on an already open case joins it instead of opening one.
                    open_row = conn.execute(
                        "SELECT data FROM cases WHERE device_id = ? AND open = 1", (caller.id,)
                    ).fetchone()
                    case = case_from_dict(json.loads(open_row[0])) if open_row else None
                if case is not None:
                    case_id = case.id
                    step("case", f"case {case.id} opened")
                    for n in conn.execute(
                        "SELECT person_id, channel, outcome, detail FROM notifications "
                        "WHERE case_id = ? ORDER BY id",
                        (case.id,),
                    ):
                        step(
                            f"n{n['person_id']}{n['channel']}",
                            f"{_who(loaded, n['person_id'])} by {n['channel']}: {n['outcome']}"
                            + (f" ({n['detail']})" if n["detail"] else ""),
                        )
                    if case.accepted_by:
                        step(
                            "accepted",
                            f"ACCEPTED by {_who(loaded, case.accepted_by)}; "
                            "the caller shows 'help is coming'",
                        )
                        print(
                            f"TEST CALL PASSED in {time.time() - started:.0f} s. The case "
                            f"stays open until it is resolved: the person who accepted "
                            f"should mark it resolved."
                        )
                        return 0
            conn.close()
        time.sleep(0.5)
    if case_id is None:
        print(
            "TEST CALL FAILED: no green press arrived. Check the caller's power and link "
            "(onetouch-gateway status), then try again.",
            file=sys.stderr,
        )
    else:
        print(
            f"TEST CALL FAILED: case {case_id} was not accepted in time. Run "
            f"'onetouch-gateway cases --case {case_id}' to see who was called.",
            file=sys.stderr,
        )
    return 1


def add_commands(sub: Any, config_arg: Any) -> None:
    p = sub.add_parser("status", help="is the gateway running, its links, callers, cases")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("roster", help="who is on duty over the next days")
    config_arg(p)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_roster)
    p = sub.add_parser("cases", help="open and recent cases, or one case's story")
    config_arg(p)
    p.add_argument("--open", action="store_true", help="open cases only")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--case", help="show the whole story of this case")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cases)
    p = sub.add_parser("test-call", help="watch a real test press go through end to end")
    config_arg(p)
    p.add_argument("caller", type=int, help="caller id, as in residents.toml")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    p.set_defaults(func=cmd_test_call)
