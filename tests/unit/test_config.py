from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.config import ConfigError, load, load_residents

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads_with_paths_beside_it():
    loaded = load(REPO / "config" / "gateway.toml")
    gw = loaded.gateway
    assert gw.village.id == "xiaowang"
    assert gw.residents_path == REPO / "config" / "residents.toml"
    assert gw.topic_prefix == "onetouch/xiaowang"
    assert len(loaded.residents.caller) == 36
    assert all(len(c.key_bytes) == 16 for c in loaded.residents.caller)


def _write(tmp_path: Path, gateway: str, residents: str = "") -> Path:
    (tmp_path / "residents.toml").write_text(residents)
    for name in ("people.toml", "roster.toml"):
        shutil.copy(REPO / "config" / name, tmp_path / name)
    path = tmp_path / "gateway.toml"
    path.write_text(gateway)
    return path


MINIMAL = '[village]\nid = "v1"\n[links.mqtt]\n'


def test_relative_store_path_is_taken_from_the_config_folder(tmp_path):
    gw = load(_write(tmp_path, MINIMAL + '[store]\npath = "db/g.db"\n')).gateway
    assert gw.store.path == tmp_path / "db" / "g.db"


@pytest.mark.parametrize(
    ("residents", "expected"),
    [
        (
            '[[caller]]\nid = 7\nkey = "zz"\nresident = "a"\n',
            "residents.toml: caller[id=7].key: key must be hexadecimal digits (value: 'zz')",
        ),
        (
            '[[caller]]\nid = 7\nkey = "00"\nresident = "a"\n',
            "caller[id=7].key: key must be 32 hex digits, got 2 (value: '00')",
        ),
        (
            '[[caller]]\nid = 0\nkey = "' + "0" * 32 + '"\nresident = "a"\n',
            "caller[id=0].id: Input should be greater than or equal to 1 (value: 0)",
        ),
        (
            '[[caller]]\nid = 3\nkey = "' + "0" * 32 + '"\n',
            "caller[id=3].resident: required field is missing",
        ),
        (
            '[[caller]]\nid = 3\nkey = "' + "0" * 32 + '"\nresident = "a"\nphoen = "1"\n',
            "caller[id=3].phoen: unknown field (misspelt?)",
        ),
        (
            '[[caller]]\nid = 3\nkey = "' + "0" * 32 + '"\nresident = "a"\n'
            '[[caller]]\nid = 3\nkey = "' + "0" * 32 + '"\nresident = "b"\n',
            "caller id 3 appears more than once",
        ),
    ],
)
def test_residents_errors_name_file_field_and_value(tmp_path, residents, expected):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, MINIMAL, residents))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, '[village]\nid = "UPPER"\ntimzone = "Nowhere/City"\n[links]\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    text = "\n".join(err.value.problems)
    assert "village.id" in text
    assert "village.timzone: unknown field (misspelt?)" in text
    assert "no device link" in text
    assert all(p.startswith(str(path)) for p in err.value.problems)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[village\n", "not valid TOML"),
        (None, "file not found"),
    ],
)
def test_unreadable_files(tmp_path, content, expected):
    path = tmp_path / "residents.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_residents(path)
