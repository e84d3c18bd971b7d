"""people.toml and roster.toml: the example files, clear errors, coverage proof."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from gateway.config import Caller, ConfigError, ResidentsFile, load_residents
from gateway.desk import Desk, Role
from gateway.village import check_coverage, load_village

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
START = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)

PEOPLE = """
[[grid]]
id = "grid-1"

[[person]]
id = "sec"
name = "王书记"
role = "secretary"
phone = "13900000001"
channels = ["sms"]

[[person]]
id = "dep"
name = "李副书记"
role = "deputy"
phone = "13900000002"
channels = ["voice"]

[[person]]
id = "gl1"
name = "张网格长"
role = "grid_leader"
phone = "13900000003"
grids = ["grid-1"]
channels = ["sms"]

[[person]]
id = "town"
name = "镇值班"
role = "town_duty"
phone = "05640000000"
channels = ["voice"]
"""

ROSTER = """
[[shift]]
days = ["daily"]
start = "08:00"
end = "20:00"
person = "sec"

[[shift]]
days = ["daily"]
start = "20:00"
end = "08:00"
person = "dep"

[escalation]
[[escalation.step]]
on_duty = true
ack_timeout_s = 60
"""


def residents(*grids: str) -> ResidentsFile:
    return ResidentsFile(
        caller=[
            Caller(id=1000 + i, key="00" * 16, resident=f"居民{i}", grid=g)
            for i, g in enumerate(grids)
        ]
    )


def write(tmp_path: Path, people: str = PEOPLE, roster: str = ROSTER) -> tuple[Path, Path]:
    pp, rp = tmp_path / "people.toml", tmp_path / "roster.toml"
    pp.write_text(people, encoding="utf-8")
    rp.write_text(roster, encoding="utf-8")
    return pp, rp


def problems_of(tmp_path: Path, people: str = PEOPLE, roster: str = ROSTER) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_village(*write(tmp_path, people, roster), residents("grid-1"))
    return caught.value.problems


def test_the_example_village_loads_and_is_fully_covered() -> None:
    res = load_residents(CONFIG / "residents.toml")
    village = load_village(CONFIG / "people.toml", CONFIG / "roster.toml", res)
    assert len(village.people) == 7
    assert {p.role for p in village.people.values()} == set(Role)
    assert len(village.callers) == 36
    assert village.roster.timezone == "Asia/Shanghai"
    assert check_coverage(village, START) == []
    # The override dates in the example are covered too (Spring Festival eve).
    assert check_coverage(village, dt.datetime(2027, 2, 5, tzinfo=dt.UTC)) == []
    Desk(village)  # and the desk accepts it


def test_defaults(tmp_path: Path) -> None:
    village = load_village(*write(tmp_path), residents("grid-1"))
    s = village.settings
    assert (s.must_come_s, s.cancel_window_s, s.heartbeat_allowance_s) == (1800, 10, 3600)
    assert village.roster.timezone == "Asia/Shanghai"
    assert village.roster.escalation.repeat == 1
    assert village.roster.escalation.exhausted_role is Role.TOWN_DUTY


def test_a_bad_value_names_file_field_and_value(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, PEOPLE.replace('role = "deputy"', 'role = "mayor"'))
    assert str(tmp_path / "people.toml") in problem
    assert "person[id=dep].role" in problem
    assert "'mayor'" in problem


def test_a_channel_without_its_address_is_refused(tmp_path: Path) -> None:
    people = PEOPLE.replace('channels = ["voice"]', 'channels = ["voice", "app"]', 1)
    [problem] = problems_of(tmp_path, people)
    assert "person[id=dep]" in problem
    assert "app_id" in problem


def test_roster_errors_name_the_roster_file(tmp_path: Path) -> None:
    roster = "heartbeat_allowance_s = 172800\ntimezone = 'Mars/Olympus'\n" + ROSTER.replace(
        'start = "08:00"', 'start = "8 am"'
    )
    problems = problems_of(tmp_path, roster=roster)
    text = "\n".join(problems)
    assert all(p.startswith(str(tmp_path / "roster.toml")) for p in problems)
    assert "shift[0].start" in text
    assert "'8 am'" in text
    assert "heartbeat_allowance_s" in text
    assert "172800" in text
    assert "'Mars/Olympus'" in text


def test_unknown_people_in_the_roster_are_named(tmp_path: Path) -> None:
    roster = ROSTER.replace('person = "dep"', 'person = "deputy"') + (
        '\n[[override]]\ndate = 2026-12-01\naction = "replace"\nperson = "sec"\nby = "ghost"\n'
    )
    problems = problems_of(tmp_path, roster=roster)
    assert any("shift[1].person" in p and "'deputy'" in p for p in problems)
    assert any("override[date=2026-12-01].by" in p and "'ghost'" in p for p in problems)


def test_check_coverage_finds_a_gap_in_the_week(tmp_path: Path) -> None:
    roster = ROSTER.replace('start = "20:00"\nend = "08:00"', 'start = "21:00"\nend = "07:00"')
    village = load_village(*write(tmp_path, roster=roster), residents("grid-1"))
    problems = check_coverage(village, START)
    assert len(problems) == 14  # 07:00-07:59 and 20:00-20:59, on each of 7 days
    assert f"{tmp_path / 'roster.toml'}: shift: nobody on duty on mon 07:00-07:59" in problems[0]


def test_check_coverage_finds_a_gap_made_by_leave(tmp_path: Path) -> None:
    roster = ROSTER + '\n[[override]]\ndate = 2026-11-26\naction = "off"\nperson = "sec"\n'
    village = load_village(*write(tmp_path, roster=roster), residents("grid-1"))
    [problem] = check_coverage(village, START)
    assert "override[date=2026-11-26]" in problem
    assert "08:00-19:59" in problem
    assert "off sec" in problem


def test_check_coverage_finds_an_unreachable_person(tmp_path: Path) -> None:
    people = PEOPLE.replace('channels = ["voice"]\n', "channels = []\n", 1)
    village = load_village(*write(tmp_path, people), residents("grid-1"))
    [problem] = check_coverage(village, START)
    assert problem.startswith(str(tmp_path / "people.toml"))
    assert "person[id=dep].channels" in problem
    assert "shift[1].person" in problem


def test_check_coverage_finds_a_grid_without_leader_and_an_unknown_grid(tmp_path: Path) -> None:
    people = PEOPLE.replace(
        '[[grid]]\nid = "grid-1"', '[[grid]]\nid = "grid-1"\n[[grid]]\nid = "grid-2"'
    )
    village = load_village(
        *write(tmp_path, people), residents("grid-1", "grid-2", "grid-2", "grid-9")
    )
    problems = check_coverage(village, START)
    assert len(problems) == 2
    assert "grid[id=grid-2]: no grid_leader" in problems[0]
    assert "caller 1001 and 1 more" in problems[0]
    assert "caller[id=1003].grid" in problems[1]
    assert "'grid-9'" in problems[1]


def test_a_person_in_an_unknown_grid_is_refused(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, PEOPLE.replace('grids = ["grid-1"]', 'grids = ["grid-7"]'))
    assert "person[id=gl1].grids" in problem
    assert "'grid-7'" in problem
