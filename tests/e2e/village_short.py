"""A small village whose escalation steps time out in seconds, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

PEOPLE = """
[[grid]]
id = "grid-1"
name = "一网格"
[[grid]]
id = "grid-2"
name = "二网格"
[[grid]]
id = "grid-3"
name = "三网格"

[[person]]
id = "a"
name = "甲书记"
role = "secretary"
phone = "13900000001"
app_id = "app-a"
app_key = "d4363b4d076b0c7e749f279727fbd3f8"
channels = ["app"]

[[person]]
id = "b"
name = "乙副书记"
role = "deputy"
phone = "13900000002"
app_id = "app-b"
app_key = "7208e64520e94afe455156c243bfd5b4"
channels = ["app"]

[[person]]
id = "t"
name = "镇值班"
role = "town_duty"
phone = "13900000009"
app_id = "app-t"
app_key = "6bac21e2a9bdda1af191b0e853340385"
channels = ["app"]

[[person]]
id = "g"
name = "网格长"
role = "grid_leader"
phone = "13900000003"
app_id = "app-g"
app_key = "b487ba21c187d746d3cabe051c18c926"
grids = ["grid-1", "grid-2", "grid-3"]
channels = ["app"]
"""

ROSTER = """
timezone = "Asia/Shanghai"
cancel_window_s = 2

[[shift]]
days = ["daily"]
start = "00:00"
end = "24:00"
person = "a"

[escalation]
repeat = 0
exhausted = {{ role = "town_duty" }}

[[escalation.step]]
person = "a"
ack_timeout_s = {first}

[[escalation.step]]
person = "b"
ack_timeout_s = {second}
"""


def use_village(gateway_toml: Path, people: str, roster: str,
                directory: Path | None = None) -> None:
    """Write people.toml and roster.toml (beside gateway.toml unless told where)
    and point gateway.toml at them."""
    directory = directory or gateway_toml.parent
    (directory / "people.toml").write_text(people)
    (directory / "roster.toml").write_text(roster)
    text = gateway_toml.read_text()
    start = text.index("people = ")
    end = text.index("\n\n", start)
    text = (text[:start] + f'people = "{directory / "people.toml"}"\n'
            f'roster = "{directory / "roster.toml"}"' + text[end:])
    gateway_toml.write_text(text)


def write_short_village(directory: Path, gateway_toml: Path, *, first: float = 10.0,
                        second: float = 10.0) -> None:
    """Point an existing gateway.toml at people and roster files with short timeouts."""
    use_village(gateway_toml, PEOPLE, ROSTER.format(first=first, second=second), directory)
