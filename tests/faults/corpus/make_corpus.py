"""Regenerates frames.txt, mqtt_answers.jsonl, at_responses.txt, sms_pdus.txt and
the district's downlink: sync_acks.jsonl, config_pushes.jsonl, sync_batches.jsonl.

    .venv/bin/python -m tests.faults.corpus.make_corpus

The files are kept in the repository: this script only documents where the
valid entries came from.  Add any input that once broke a parser by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from firmware_protocol import (
    Ack,
    AckStatus,
    Buzzer,
    CallerAck,
    CallerState,
    Feedback,
    Heartbeat,
    Key,
    KeyPress,
    LedColor,
    LedPattern,
    Message,
    encode,
)
from gateway.notify.app import sign_answer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KEY = bytes(range(16))
# The district seeds are for this village and this gateway database.
VILLAGE = "fuzzvillage"
STORE = "0123456789abcdef0123456789abcdef"
REFUSED = "# refused: every line below must be rejected by the model"


def frames() -> list[str]:
    msgs: list[Message] = [
        KeyPress(Key.CALL),
        KeyPress(Key.HANGUP),
        KeyPress(Key.UP),
        KeyPress(Key.DOWN),
        Heartbeat(3000, 87, -71, external_power=False, low_battery=False),
        Heartbeat(2900, None, -110, external_power=True, low_battery=True),
        Ack(7, AckStatus.STORED),
        CallerAck(12),
        Feedback(CallerState.RECEIVED, LedColor.AMBER, LedPattern.SLOW_BLINK, Buzzer.SILENT),
    ]
    out = ["# one frame or byte string per line, hex; '#' lines are comments"]
    valid = [encode(m, device_id=1001 + i, counter=1 + i, key=KEY) for i, m in enumerate(msgs)]
    out += [v.hex() for v in valid]
    out.append("# edge cases: two frames, truncated, bad CRC, garbage before, lone sync")
    out.append((valid[0] + valid[1]).hex())
    out.append(valid[0][:-3].hex())
    out.append((valid[0][:-1] + bytes([valid[0][-1] ^ 0xFF])).hex())
    out.append("ff00a5" + valid[2].hex())
    out.append("a55a")
    out.append("a5")
    out.append("a55aff")
    out.append("a55a01" + "ff" * 20)
    out.append(encode(KeyPress(Key.CALL), device_id=0xFFFFFFFF, counter=0xFFFFFFFF, key=KEY).hex())
    out.append("")
    return out


def answers() -> list[str]:
    key = bytes.fromhex("d4363b4d076b0c7e749f279727fbd3f8")
    out = []
    for i, answer in enumerate(("accept", "decline", "arrived", "resolved")):
        fields = {
            "v": 1,
            "app_id": "app-a",
            "person_id": "a",
            "case_id": f"1001-{i + 1}",
            "answer": answer,
            "note": "路上" if i else "",
            "sent_at": 1.7e9 + i,
            "seq": i + 1,
        }
        fields["mac"] = sign_answer(key, fields)
        out.append(json.dumps(fields, ensure_ascii=False))
    out += [
        "{}",
        "[]",
        "null",
        '"accept"',
        "1e999",
        '{"v": 2}',
        '{"v":1,"app_id":"a","person_id":"a","case_id":"1-1","answer":"accept",'
        '"sent_at":1e309,"seq":1,"mac":"' + "0" * 64 + '"}',
        '{"v":1,"app_id":"a","person_id":"a","case_id":"1-1","answer":"accept",'
        '"sent_at":"NaN","seq":0,"mac":"' + "0" * 64 + '"}',
        '{"v":1,"app_id":"a","person_id":"a","case_id":"1-1","answer":"accept",'
        '"sent_at":1,"seq":99999999999999999999999999,"mac":"' + "G" * 64 + '"}',
    ]
    return out


def at_lines() -> list[str]:
    return [
        "# one modem read per line; \\r and \\n are written as escapes",
        r"\r\nOK\r\n",
        r"\r\nERROR\r\n",
        r"\r\n+CME ERROR: 10\r\n",
        r"\r\n+CMS ERROR: 500\r\n",
        r"\r\n+CSQ: 18,99\r\n\r\nOK\r\n",
        r"\r\n+CREG: 0,1\r\n\r\nOK\r\n",
        r"\r\n+CREG: 5\r\n",
        r"\r\n+CMTI: \"SM\",3\r\n",
        r"\r\n+CMTI: \"SM\",\r\n",
        r"\r\n+CMTI: garbage\r\n",
        r"\r\nRING\r\n\r\n+CLIP: \"13800000001\",129,\"\",0,\"\",0\r\n",
        r"\r\n+CLIP: \r\n",
        r"\r\n+CLCC: 1,0,2,0,0,\"13900000001\",129\r\n",
        r"\r\n+CLCC: 1,0,x\r\n",
        r"\r\n+QTONEDET: 49\r\n",
        r"\r\n+RXDTMF: 1\r\n",
        r"\r\n+DTMF: \r\n",
        r"\r\nNO CARRIER\r\n",
        r"\r\nBUSY\r\n",
        r"\r\nRDY\r\n",
        r"\r\n+CMGR: 0,,24\r\n"
        r"07917283010010F5040BC87238880900F10000993092516195800AE8329BFD4697D9EC37"
        r"\r\n\r\nOK\r\n",
        r"\r\n> ",
        r"\r\n+CMGS: 12\r\n\r\nOK\r\n",
        "\\xff\\xfe\\x00garbage\\r\\n",
        r"OK",
        r"\r\r\r\n\n\n",
        r"\r\n+CREG:\r\n",
        r"\r\n+CREG: ,,\r\n",
    ]


def sms_pdus() -> list[str]:
    return [
        "07917283010010F5040BC87238880900F10000993092516195800AE8329BFD4697D9EC37",
        "0006D60B911326880736F4111011719551401110117195714000",
        "00040B91",
        "",
        "zz",
        "00",
        "0004",
        "07917283010010F5440BC87238880900F10008993092516195800A",
    ]


def acks() -> list[str]:
    ok = [
        {"v": 1, "village": VILLAGE, "store": STORE, "batch": "1-3", "ids": [1, 2, 3],
         "committed_at": 1.7e9},
        {"v": 1, "village": VILLAGE, "store": STORE, "batch": "4-4", "ids": [4],
         "committed_at": 1.7e9, "newer_field": "ignored"},
        {"v": 1, "village": VILLAGE, "store": STORE, "batch": "5-5", "ids": [],
         "committed_at": 0},
    ]  # fmt: skip
    head = f'"v":1,"village":"{VILLAGE}","store":"{STORE}","batch":"1-1"'
    bad = [
        "", "{}", "[]", "null", "1e999", '"ack"', "{\"v\": 2}",
        "{" + head + ',"ids":[1],"committed_at":NaN}',
        "{" + head + ',"ids":[1],"committed_at":1e999}',
        "{" + head + ',"ids":[18446744073709551616],"committed_at":1}',
        "{" + head + ',"ids":[0],"committed_at":1}',
        "{" + head + ',"ids":[-1],"committed_at":1}',
        "{" + head + ',"ids":"1-1","committed_at":1}',
        "{" + head + ',"ids":[1.5],"committed_at":1}',
        '{"v":1,"village":"NOT A VILLAGE","store":"' + STORE + '","batch":"1","ids":[1],'
        '"committed_at":1}',
        '{"v":1,"village":"' + VILLAGE + '","store":"xyz","batch":"1","ids":[1],"committed_at":1}',
        "{" + head + ',"ids":[1],"committed_at":1',
        "\u00ff\u00fe" + "{" + head + "}",
    ]  # fmt: skip
    return [json.dumps(a) for a in ok] + [REFUSED] + bad


def pushes() -> list[str]:
    roster = (REPO / "config" / "roster.toml").read_text(encoding="utf-8")
    people = (REPO / "config" / "people.toml").read_text(encoding="utf-8")
    ok = [
        {"v": 1, "village": VILLAGE, "version": 2, "push_id": "p-roster",
         "files": {"roster.toml": roster}, "sent_at": 1.7e9},
        {"v": 1, "village": VILLAGE, "version": 3, "push_id": "p-both",
         "files": {"roster.toml": roster, "people.toml": people}},
        # Valid messages the gateway refuses: another village's, files that do not load.
        {"v": 1, "village": "othervillage", "version": 9, "push_id": "p-elsewhere",
         "files": {"roster.toml": roster}},
        {"v": 1, "village": VILLAGE, "version": 4, "push_id": "p-broken-toml",
         "files": {"roster.toml": "timezone = \"Asia/Nowhere\"\n[[shift]\n"}},
    ]  # fmt: skip
    head = f'"v":1,"village":"{VILLAGE}"'
    bad = [
        "", "{}", "[]", "null", '"push"', "1e999", '{"v": 2}',
        "{" + head + ',"version":1e999,"push_id":"p","files":{}}',
        "{" + head + ',"version":"NaN","push_id":"p","files":{}}',
        "{" + head + ',"version":99999999999999999999999,"push_id":"p","files":{}}',
        "{" + head + ',"version":0,"push_id":"p","files":{"roster.toml":""}}',
        "{" + head + ',"version":5,"push_id":"p","files":{}}',
        "{" + head + ',"version":5,"push_id":"p","files":{"gateway.toml":"x"}}',
        "{" + head + ',"version":5,"push_id":"p","files":{"../roster.toml":"x"}}',
        "{" + head + ',"version":5,"push_id":"","files":{"roster.toml":"x"}}',
        "{" + head + ',"version":5,"push_id":"' + "p" * 65 + '","files":{"roster.toml":"x"}}',
        "{" + head + ',"version":5,"push_id":"p","files":{"roster.toml":1}}',
        "{" + head + ',"version":5,"push_id":"p","files":{"roster.toml":"\\ud800"}}',
        "{" + head + ',"version":5,"push_id":"p","files":["roster.toml"]}',
        "{" + head + ',"version":5,"push_id":"p","files":{"roster.toml":"x"},"sent_at":NaN}',
        "{" + head + ',"version":5,"push_id":{"a":1},"files":{"gateway.toml":"x"}}',
        '{"v":1,"village":"Other Village","version":5,"push_id":"p","files":{"roster.toml":"x"}}',
        "{" + head + ',"version":5,"push_id":"p","files":{"roster.toml":"x"}',
    ]  # fmt: skip
    return [json.dumps(p, ensure_ascii=False) for p in ok] + [REFUSED] + bad


def batches() -> list[str]:
    case = {"id": "1001-1", "device_id": 1001, "counter": 1, "state": "opened",
            "opened_at": 1.7e9, "transitions": []}  # fmt: skip
    record = {"id": 1, "kind": "case", "case_id": "1001-1", "created_at": 1.7e9,
              "wall_trusted": True, "payload": case}  # fmt: skip
    ok = [
        {"v": 1, "village": VILLAGE, "store": STORE, "batch": "1-1", "sent_at": 1.7e9,
         "records": [record]},
        {"v": 1, "village": VILLAGE, "store": STORE, "batch": "2-3", "sent_at": 1.7e9,
         "records": [{**record, "id": 2, "payload": {**case, "state": "notifying"}},
                     {"id": 3, "kind": "general_feedback", "created_at": 1.7e9,
                      "wall_trusted": False, "payload": {"device_id": 1002, "counter": 9}}]},
    ]  # fmt: skip
    head = f'"v":1,"village":"{VILLAGE}","store":"{STORE}","batch":"1-1","sent_at":1'
    rec = '"kind":"case","case_id":"c","wall_trusted":true,"payload":{}'
    bad = [
        "", "{}", "[]", "null", '{"v": 2}',
        "{" + head + ',"records":[]}',
        "{" + head + ',"records":[{"id":18446744073709551616,"created_at":1,' + rec + "}]}",
        "{" + head + ',"records":[{"id":9223372036854775808,"created_at":1,' + rec + "}]}",
        "{" + head + ',"records":[{"id":0,"created_at":1,' + rec + "}]}",
        "{" + head + ',"records":[{"id":1,"created_at":NaN,' + rec + "}]}",
        "{" + head + ',"records":[{"id":1,"created_at":-1e999,' + rec + "}]}",
        "{" + head + ',"records":[{"id":1,"created_at":1,"kind":"case","wall_trusted":true,'
        '"payload":[]}]}',
        "{" + head + ',"records":[{"id":1,"created_at":1,"kind":"case","wall_trusted":true,'
        '"payload":{"state":"opened","times":[1,NaN]}}]}',
        "{" + head + ',"records":[{"id":1,"created_at":1,"kind":"case","wall_trusted":true,'
        '"payload":{"a":{"b":Infinity}}}]}',
    ]  # fmt: skip
    return [json.dumps(b) for b in ok] + [REFUSED] + bad


def main() -> None:
    (HERE / "frames.txt").write_text("\n".join(frames()))
    (HERE / "mqtt_answers.jsonl").write_text("\n".join(answers()) + "\n")
    (HERE / "at_responses.txt").write_text("\n".join(at_lines()) + "\n")
    (HERE / "sms_pdus.txt").write_text("\n".join(sms_pdus()) + "\n")
    (HERE / "sync_acks.jsonl").write_text("\n".join(acks()) + "\n", encoding="utf-8")
    (HERE / "config_pushes.jsonl").write_text("\n".join(pushes()) + "\n", encoding="utf-8")
    (HERE / "sync_batches.jsonl").write_text("\n".join(batches()) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
