"""Simulated secretary phones: the app end of the app channel.

    python -m simulators.app --config gateway.toml --mqtt 127.0.0.1:1883 \\
        --persona wang-shuji=ignore --persona li-fushuji=accept:5,arrived:20,resolved:40

Each person with an app in people.toml gets a phone that shows what it is
sent and answers calls by its persona: answers with delays in seconds after
the call arrives, or ``ignore`` (rings unanswered), or ``offline`` (the phone
is off: its retained status says so).  Answers are signed with the person's
app_key, as the real app does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from gateway.desk import Person
from gateway.notify.app import sign_answer

__all__ = ["Persona", "Phone", "main", "parse_persona"]

ANSWERS = ("accept", "decline", "arrived", "resolved")


@dataclass(frozen=True)
class Persona:
    plan: tuple[tuple[str, float], ...] = ()  # (answer, seconds after the call)
    offline: bool = False


def parse_persona(text: str) -> Persona:
    text = text.strip()
    if text in ("ignore", ""):
        return Persona()
    if text == "offline":
        return Persona(offline=True)
    plan = []
    for part in text.split(","):
        answer, _, delay = part.partition(":")
        if answer not in ANSWERS:
            raise ValueError(f"unknown answer {answer!r} (one of {', '.join(ANSWERS)})")
        plan.append((answer, float(delay or 0)))
    return Persona(tuple(plan))


class Phone:
    """One person's phone with the app: one MQTT connection, like the real app."""

    def __init__(
        self,
        person: Person,
        persona: Persona,
        host: str,
        port: int,
        prefix: str,
        say: Callable[[str], None],
    ) -> None:
        if not (person.app_id and person.app_key):
            raise ValueError(f"{person.id} has no app_id and app_key")
        self.person = person
        self.persona = persona
        self.host, self.port = host, port
        self.base = f"{prefix}/app/{person.app_id}"
        self.say = say
        self.seq = int(time.time() * 1000)  # grows across restarts of the simulator
        self.received: list[dict[str, Any]] = []

    async def run(self) -> None:
        will = aiomqtt.Will(f"{self.base}/status", b"offline", qos=1, retain=True)
        async with aiomqtt.Client(self.host, self.port, will=will, timeout=10) as client:
            await client.publish(
                f"{self.base}/status",
                b"offline" if self.persona.offline else b"online",
                qos=1,
                retain=True,
            )
            if self.persona.offline:
                await asyncio.Event().wait()
            await client.subscribe(f"{self.base}/notify", qos=1)
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for message in client.messages:
                    note = json.loads(message.payload)  # type: ignore[arg-type]
                    self.received.append(note)
                    self.say(f"{self.person.name}'s phone: {note['kind']}: {note['text']}")
                    if note["kind"] in ("call", "urgent_call") and note.get("case_id"):
                        t = asyncio.create_task(self._answer(client, note["case_id"]))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
            finally:
                for t in tasks:
                    t.cancel()
                with contextlib.suppress(Exception):
                    await client.publish(f"{self.base}/status", b"offline", qos=1, retain=True)

    async def _answer(self, client: aiomqtt.Client, case_id: str) -> None:
        start = time.monotonic()
        for answer, delay in self.persona.plan:
            await asyncio.sleep(max(0.0, start + delay - time.monotonic()))
            self.seq += 1
            fields: dict[str, Any] = {
                "v": 1,
                "app_id": self.person.app_id,
                "person_id": self.person.id,
                "case_id": case_id,
                "answer": answer,
                "note": "",
                "sent_at": time.time(),
                "seq": self.seq,
            }
            assert self.person.app_key is not None
            fields["mac"] = sign_answer(self.person.app_key, fields)
            await client.publish(f"{self.base}/answer", json.dumps(fields).encode(), qos=1)
            self.say(f"{self.person.name} answers {answer} for case {case_id}")


async def run_phones(phones: list[Phone]) -> None:
    async with asyncio.TaskGroup() as tg:
        for phone in phones:
            tg.create_task(phone.run())


def main(argv: list[str] | None = None) -> int:
    from gateway.config import ConfigError, load

    p = argparse.ArgumentParser(
        prog="python -m simulators.app",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the gateway's gateway.toml")
    p.add_argument("--mqtt", required=True, metavar="HOST:PORT")
    p.add_argument(
        "--persona",
        action="append",
        default=[],
        metavar="PERSON=PLAN",
        help="e.g. wang-shuji=accept:5,arrived:30,resolved:60 or li=ignore",
    )
    p.add_argument("--default", default="ignore", help="persona of everyone else")
    args = p.parse_args(argv)
    try:
        loaded = load(args.config)
    except ConfigError as exc:
        raise SystemExit("\n".join(exc.problems)) from None
    people = loaded.village.people
    personas: dict[str, Persona] = {}
    try:
        default = parse_persona(args.default)
        for item in args.persona:
            person_id, _, plan = item.partition("=")
            if person_id not in people:
                raise ValueError(f"no person {person_id!r} in people.toml")
            personas[person_id] = parse_persona(plan)
    except ValueError as exc:
        raise SystemExit(f"--persona: {exc}") from None
    host, _, port = args.mqtt.rpartition(":")

    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)

    phones = [
        Phone(person, personas.get(pid, default), host, int(port), loaded.gateway.topic_prefix, say)
        for pid, person in people.items()
        if person.app_id and person.app_key
    ]
    say(
        f"{len(phones)} phones with the app: "
        + ", ".join(f"{ph.person.name} ({ph.person.id})" for ph in phones)
    )
    try:
        asyncio.run(run_phones(phones))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
