"""Fuzzing every parser that faces the outside world.

Each parser first replays its seed corpus in ``tests/faults/corpus/`` (kept in
the repository; add an input there whenever one breaks a parser), then gets
hypothesis' random and mutated inputs.  The rule is the same everywhere: bad
input gives the parser's documented answer (a ``Rejected`` item, a
``pydantic.ValidationError``, ``ValueError``, ``None``, a ``ConfigError`` that
names the file), never any other exception.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from firmware_protocol import Frame, FrameDecoder, Rejected, decode_frame
from gateway.config import ConfigError, load, load_residents
from gateway.metrics import Metrics
from gateway.notify.app import Answer
from gateway.notify.modem import IncomingSms, Modem, _AtProtocol, decode_sms_deliver, parse_reply
from gateway.village import load_people, load_roster

from ..conftest import IN_CI, REPO

CORPUS = Path(__file__).resolve().parent / "corpus"
# Under CI the examples are derandomised (a fixed sequence: the build is
# repeatable); on a developer's machine every run explores new inputs, and the
# hypothesis database replays any failure found before.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=IN_CI,
)


def _lines(name: str) -> list[str]:
    return [
        line
        for line in (CORPUS / name).read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]


FRAMES = [bytes.fromhex(line) for line in _lines("frames.txt")]
ANSWERS = _lines("mqtt_answers.jsonl")
AT_READS = [
    codecs.decode(line, "unicode_escape").encode("latin-1") for line in _lines("at_responses.txt")
]
PDUS = (CORPUS / "sms_pdus.txt").read_text().splitlines()
# configs/<file>__<what>.toml replaces config/<file>.toml; "_ok" ones must load.
CONFIGS = sorted((CORPUS / "configs").glob("*.toml"))


def _chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        yield data[a:b]


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, drop or insert bytes: (op, position, value)."""
    buf = bytearray(data)
    for op, pos, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = pos % len(buf)
        if op == 0:
            buf[i] ^= value or 1
        elif op == 1:
            del buf[i]
        else:
            buf.insert(i, value)
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
)


# -- (a) frames ---------------------------------------------------------------------


def _check_decoder(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    items: list[Frame | Rejected] = []
    for chunk in _chunks(data, cuts):
        items += decoder.feed(chunk)
    items += decoder.flush()
    assert all(isinstance(i, Frame | Rejected) for i in items)
    assert decoder.buffered == 0
    whole = decode_frame(data)
    assert isinstance(whole, Frame | Rejected)
    # However the bytes were cut, the same frames come out.
    one = FrameDecoder()
    in_one = [i for i in [*one.feed(data), *one.flush()] if isinstance(i, Frame)]
    assert [f.raw for f in items if isinstance(f, Frame)] == [f.raw for f in in_one]


def test_frame_corpus_replays():
    assert len(FRAMES) >= 10
    decoded = [decode_frame(raw) for raw in FRAMES]
    assert sum(isinstance(d, Frame) for d in decoded) >= 9  # the valid seeds stay valid
    for raw in FRAMES:
        _check_decoder(raw, [1, 5, 13])


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8))
def test_frame_decoder_never_raises_on_arbitrary_bytes(data: bytes, cuts: list[int]):
    _check_decoder(data, cuts)


@FUZZ
@given(
    st.sampled_from(FRAMES),
    edits,
    st.lists(st.integers(0, 400), max_size=8),
    st.binary(max_size=8),
    st.binary(max_size=8),
)
def test_frame_decoder_on_mutated_frames(seed, ed, cuts, before, after):
    _check_decoder(before + _mutate(seed, ed) + after, cuts)


@FUZZ
@given(
    st.sampled_from([f for f in FRAMES if isinstance(decode_frame(f), Frame)]),
    st.binary(max_size=40),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_a_valid_frame_after_garbage_is_still_found(seed: bytes, garbage: bytes, cuts):
    assume(b"\xa5" not in garbage)  # a sync byte in the garbage may legitimately swallow it
    decoder = FrameDecoder()
    items: list[Frame | Rejected] = []
    for chunk in _chunks(garbage + seed, cuts):
        items += decoder.feed(chunk)
    items += decoder.flush()
    assert [i.raw for i in items if isinstance(i, Frame)] == [seed]


# -- (b) the app's answers over MQTT ------------------------------------------------


def _answer(text: str | bytes) -> None:
    with contextlib.suppress(pydantic.ValidationError):
        Answer.model_validate_json(text)


def test_answer_corpus_replays():
    for line in ANSWERS[:4]:  # the signed, valid seeds
        Answer.model_validate_json(line)
    for line in ANSWERS[4:]:
        _answer(line)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_answer_parser_on_arbitrary_text(text):
    _answer(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(st.sampled_from(ANSWERS[:4]), st.data())
def test_answer_parser_on_mutated_answers(seed: str, data: st.DataObject):
    fields = json.loads(seed)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "drop", "add"]))
        if op == "set":
            fields[data.draw(st.sampled_from(sorted(fields) or ["v"]))] = data.draw(json_values)
        elif op == "drop" and fields:
            fields.pop(data.draw(st.sampled_from(sorted(fields))))
        else:
            fields[data.draw(st.text(max_size=10))] = data.draw(json_values)
    text = json.dumps(fields, ensure_ascii=data.draw(st.booleans()), allow_nan=True)
    _answer(text)
    raw = _mutate(text.encode(), data.draw(edits))  # and byte damage on top
    _answer(raw)


# -- (c) the modem's AT responses and SMS -------------------------------------------


async def _feed_modem(reads: list[bytes]) -> Metrics:
    metrics = Metrics()
    modem = Modem("/dev/null", metrics=metrics)
    failures: list[BaseException] = []
    on_line = modem._on_line

    def checked(raw: bytes) -> None:
        # _AtProtocol logs and swallows a failing line; the fuzzer wants to see it.
        try:
            on_line(raw)
        except BaseException as exc:
            failures.append(exc)
            raise

    modem._on_line = checked  # type: ignore[method-assign]
    protocol = _AtProtocol(modem)
    for data in reads:
        protocol.data_received(data)
    await asyncio.sleep(0)  # let spawned work (rejecting a call) start and fail quietly
    for task in list(modem._tasks):
        task.cancel()
    assert not failures, failures
    return metrics


def test_at_corpus_replays():
    metrics = asyncio.run(_feed_modem(AT_READS))
    assert metrics.get("gateway_modem_garbage_lines_total") >= 1
    assert metrics.get("gateway_modem_urcs_total") >= 5


@FUZZ
@given(
    st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(AT_READS)), max_size=12),
    st.lists(st.tuples(st.integers(0, 11), edits), max_size=3),
)
def test_at_line_reader_never_raises(reads: list[bytes], damage):
    reads = list(reads)
    for i, ed in damage:
        if reads:
            reads[i % len(reads)] = _mutate(reads[i % len(reads)], ed)
    asyncio.run(_feed_modem(reads))


def _pdu(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(decode_sms_deliver(text), IncomingSms)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=100).map(bytes.hex),
        st.tuples(st.sampled_from(PDUS), edits).map(
            lambda t: _mutate(t[0].encode(), t[1]).decode("latin-1")
        ),
    )
)
@example("")
def test_sms_pdu_decoder_raises_only_value_error(text: str):
    for seed in PDUS:
        _pdu(seed)
    _pdu(text)


@FUZZ
@given(st.text(max_size=120))
@example("不接 1017-5")
@example("１")
def test_sms_reply_parser_returns_or_none(text: str):
    result = parse_reply(text)
    assert result is None or (
        result[0] in ("accept", "decline", "arrived", "resolved")
        and (result[1] is None or "-" in result[1])
    )


# -- (d) configuration files --------------------------------------------------------

EXAMPLES = {
    name: (REPO / "config" / f"{name}.toml").read_bytes()
    for name in ("gateway", "people", "roster", "residents")
}
ODD_VALUES = [
    '""',
    "-1",
    "0",
    "1e309",
    "true",
    "[]",
    "{}",
    "nan",
    "-inf",
    '"' + "x" * 300 + '"',
    "99999999999999999999",
    '"\\u0000"',
    "1979-05-27T07:32:00Z",
    '["a", 1]',
    "{ x = 1 }",
    '"25:00"',
    '"Asia/Nowhere"',
    '"../../etc/passwd"',
]


def _mutate_toml(text: str, data: st.DataObject) -> str:
    """Structure-aware damage: replace values, drop or repeat lines, add keys."""
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        assignments = [
            i for i, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")
        ]
        op = data.draw(st.sampled_from(["value", "drop", "repeat", "unknown", "bytes"]))
        if op == "value" and assignments:
            i = data.draw(st.sampled_from(assignments))
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {data.draw(st.sampled_from(ODD_VALUES))}"
        elif op == "drop" and lines:
            del lines[data.draw(st.integers(0, len(lines) - 1))]
        elif op == "repeat" and lines:
            i = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
        elif op == "unknown":
            i = data.draw(st.integers(0, len(lines)))
            lines.insert(i, f"{data.draw(st.from_regex(r'[a-z_]{1,8}', fullmatch=True))} = 1")
        elif op == "bytes":
            raw = _mutate("\n".join(lines).encode(), data.draw(edits))
            return raw.decode("utf-8", errors="surrogateescape")
    return "\n".join(lines) + "\n"


class _ConfigSet:
    """The four example files in a folder of their own, one of them replaced."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fuzzcfg-"))

    def write(self, target: str, content: bytes) -> Path:
        for name, text in EXAMPLES.items():
            (self.dir / f"{name}.toml").write_bytes(content if name == target else text)
        return self.dir / "gateway.toml"

    def check(self, target: str, content: bytes) -> None:
        gateway = self.write(target, content)
        files = [str((self.dir / f"{n}.toml").resolve()) for n in EXAMPLES]
        loaders = {
            "gateway": lambda: load(gateway),
            "people": lambda: load_people(self.dir / "people.toml"),
            "roster": lambda: load_roster(self.dir / "roster.toml"),
            "residents": lambda: load_residents(self.dir / "residents.toml"),
        }
        for name in ("gateway", target):
            problems: list[str] | None = None
            try:
                loaders[name]()
            except ConfigError as exc:
                problems = exc.problems
            if problems is None:
                continue
            assert problems, "a ConfigError with no problem in it"
            for problem in problems:
                # Each problem starts with the file it is about: one of the four,
                # or a file gateway.toml names, which then also says which field
                # named it ("<dir>/x: file not found (named by files.residents in
                # <dir>/gateway.toml)").
                assert (
                    any(problem.startswith(f"{f}: ") for f in files)
                    or (problem.startswith(str(self.dir)) and "(named by files." in problem)
                    or (problem.startswith(f"{self.dir}/") and ": " in problem)
                ), f"problem does not name its file: {problem!r}"


@pytest.fixture(scope="module")
def config_set() -> Iterator[_ConfigSet]:
    s = _ConfigSet()
    yield s
    shutil.rmtree(s.dir, ignore_errors=True)


def test_config_corpus_replays(config_set: _ConfigSet):
    assert len(CONFIGS) >= 5
    config_set.check("gateway", EXAMPLES["gateway"])  # the examples themselves load
    load(config_set.dir / "gateway.toml")
    for path in CONFIGS:
        target = path.name.split("__", 1)[0]
        config_set.check(target, path.read_bytes())
        if path.stem.endswith("_ok"):  # odd but valid, e.g. a village with no callers yet
            load(config_set.dir / "gateway.toml")
            continue
        with pytest.raises(ConfigError):
            load(config_set.dir / "gateway.toml")


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(sorted(EXAMPLES)), st.data())
def test_config_loaders_on_mutated_examples(
    config_set: _ConfigSet, target: str, data: st.DataObject
):
    text = EXAMPLES[target].decode()
    mutated = _mutate_toml(text, data)
    config_set.check(target, mutated.encode("utf-8", errors="surrogateescape"))


@pytest.mark.parametrize("value", ['""', '"' + "x" * 300 + '"'])
def test_unreadable_referenced_file_is_a_config_error(config_set: _ConfigSet, value: str):
    text = (
        EXAMPLES["gateway"].decode().replace('residents = "residents.toml"', f"residents = {value}")
    )
    gateway = config_set.write("gateway", text.encode())
    with pytest.raises(ConfigError) as caught:
        load(gateway)
    assert all(p.startswith(str(gateway)) or "residents" in p for p in caught.value.problems)
