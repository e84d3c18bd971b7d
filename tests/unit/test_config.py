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


MODEM = MINIMAL + '[modem]\nport = "/dev/ttyUSB2"\n'


def test_modem_defaults_reset_by_at_and_answered_is_not_accepted(tmp_path):
    modem = load(_write(tmp_path, MODEM)).gateway.modem
    assert modem is not None
    assert modem.reset == ["at"]
    assert modem.reset_command is None
    assert modem.answered_call_accepts is False


def test_modem_reset_command_and_answered_call_accepts(tmp_path):
    text = (
        MODEM + 'reset = ["at", "command"]\nreset_command = ["/usr/local/bin/modem-reset", "-h"]\n'
        "reset_boot_s = 30\nanswered_call_accepts = true\n"
    )
    modem = load(_write(tmp_path, text)).gateway.modem
    assert modem is not None
    assert modem.reset == ["at", "command"]
    assert modem.reset_command == ["/usr/local/bin/modem-reset", "-h"]
    assert modem.reset_boot_s == 30
    assert modem.answered_call_accepts is True


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('reset = ["at", "reboot"]', "modem.reset[1]: Input should be 'at' or 'command'"),
        ('reset = ["at", "at"]', "modem.reset: lists ['at'] more than once"),
        ('reset = "at"', "modem.reset: Input should be a valid list"),
        (
            'reset = ["command"]',
            'modem.reset_command: reset includes "command" but no program is given',
        ),
        (
            'reset_command = ["/usr/local/bin/modem-reset"]',
            "modem.reset_command: is set but reset = ['at'] does not include \"command\"",
        ),
        (
            'reset = ["command"]\nreset_command = ["modem-reset"]',
            "modem.reset_command: the program 'modem-reset' must be an absolute path",
        ),
        ('reset = ["command"]\nreset_command = []', "modem.reset_command: must name a program"),
        ("reset_command_timeout_s = 0", "modem.reset_command_timeout_s: Input should be greater"),
        ('answered_call_accepts = "maybe"', "modem.answered_call_accepts: Input should be a"),
    ],
)
def test_modem_reset_errors_name_the_field(tmp_path, lines, expected):
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, MODEM + lines + "\n"))
    assert any(expected in p for p in err.value.problems), err.value.problems
