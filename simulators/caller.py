"""A simulated four-key caller that behaves like the real firmware (SPEC.md).

    python -m simulators.caller --config config/gateway.toml --device 1001 \\
        --serial /dev/pts/7 --key call          # one press, wait for the ack, exit
    python -m simulators.caller --config ... --device 1001 --mqtt 127.0.0.1:1883 --interactive
    python -m simulators.caller --config ... --mqtt 127.0.0.1:1883 --many 30 --rate 2 --duration 20

Frame counters persist in ``--state-dir`` with the same block reservation the
firmware uses, so a restarted simulator never repeats a counter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_protocol import (
    Ack,
    CallerAck,
    CallerState,
    Feedback,
    Frame,
    FrameDecoder,
    Heartbeat,
    Key,
    KeyPress,
    LedColor,
    LedPattern,
    Message,
    decode_frame,
    encode,
    verify_mac,
)

__all__ = ["CounterFile", "MqttBus", "PressResult", "SerialBus", "SimCaller", "main"]

ACK_TIMEOUT_S = 1.0
RETRY_BASE_S = 0.5
RETRY_CAP_S = 8.0
COUNTER_BLOCK = 256

KEY_NAMES = {"call": Key.CALL, "hangup": Key.HANGUP, "up": Key.UP, "down": Key.DOWN}


class CounterFile:
    """Frame counters kept on disk the way firmware keeps them in flash.

    The file holds, per device, a reservation R: counters below R may have been
    used.  On start a device continues at R and at once reserves R + 256;
    only every 256th frame writes the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, dict[str, int]] = {}
        if path.exists():
            self._data = json.loads(path.read_text())
        self._next: dict[int, int] = {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data))
        os.replace(tmp, self.path)

    def next_up(self, device_id: int) -> int:
        entry = self._data.setdefault(str(device_id), {"reserved": 1, "down": 0})
        if device_id not in self._next:
            self._next[device_id] = entry["reserved"]
            entry["reserved"] += COUNTER_BLOCK
            self._save()
        counter = self._next[device_id]
        self._next[device_id] = counter + 1
        if counter + 1 >= entry["reserved"]:
            entry["reserved"] = counter + 1 + COUNTER_BLOCK
            self._save()
        return counter

    def last_down(self, device_id: int) -> int:
        return self._data.get(str(device_id), {}).get("down", 0)

    def set_down(self, device_id: int, counter: int, persist: bool = False) -> None:
        entry = self._data.setdefault(str(device_id), {"reserved": 1, "down": 0})
        entry["down"] = counter
        if persist:
            self._save()

    def flush(self) -> None:
        self._save()


@dataclass
class PressResult:
    key: Key
    counter: int
    acked: bool
    attempts: int
    latency_s: float  # first transmission to acknowledgement
    sent_at: float = 0.0  # wall clock of the first transmission
    done_at: float = 0.0  # wall clock of the acknowledgement (or of giving up)
    device_id: int = 0


class SimCaller:
    """One caller: sends frames, repeats presses until acknowledged, obeys feedback."""

    def __init__(
        self,
        device_id: int,
        key: bytes,
        counters: CounterFile,
        send: Callable[[int, bytes], Any],
        *,
        on_feedback: Callable[[SimCaller, Feedback], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self._key = key
        self._counters = counters
        self._send = send
        self._on_feedback = on_feedback
        self._waiting: dict[int, asyncio.Event] = {}
        self._press_lock = asyncio.Lock()
        self.state = CallerState.IDLE
        self.led = (LedColor.OFF, LedPattern.OFF)
        self.retransmissions = 0
        self.rejected_downlink = 0
        self._held_caller_ack: int | None = None

    def _frame(self, message: Message) -> tuple[int, bytes]:
        counter = self._counters.next_up(self.device_id)
        return counter, encode(message, device_id=self.device_id, counter=counter, key=self._key)

    async def press(self, key: Key, give_up_s: float | None = None) -> PressResult:
        """Send a key press and repeat it, byte for byte, until it is acknowledged."""
        # Presses queue in order: a green then a red must arrive as green, red.
        async with self._press_lock:
            counter, frame = self._frame(KeyPress(key))
            acked = asyncio.Event()
            self._waiting[counter] = acked
            start = time.monotonic()
            sent_at = time.time()
            attempt = 0

            def result(ok: bool) -> PressResult:
                done, elapsed = time.time(), time.monotonic() - start
                device = self.device_id
                return PressResult(key, counter, ok, attempt, elapsed, sent_at, done, device)

            try:
                while True:
                    attempt += 1
                    await self._send(self.device_id, frame)
                    try:
                        await asyncio.wait_for(acked.wait(), ACK_TIMEOUT_S)
                        return result(True)
                    except TimeoutError:
                        pass
                    delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1))
                    delay += random.uniform(0, delay / 2)
                    if give_up_s is not None and time.monotonic() - start + delay > give_up_s:
                        return result(False)
                    self.retransmissions += 1
                    await asyncio.sleep(delay)
            finally:
                self._waiting.pop(counter, None)
                held, self._held_caller_ack = self._held_caller_ack, None
                if held is not None:
                    await self._send_caller_ack(held)

    async def heartbeat(self, battery_mv: int = 3000, battery_pct: int | None = 87) -> None:
        if self._press_lock.locked():
            return  # SPEC.md 10.2 rule 3: the repeated press shows we are alive
        _, frame = self._frame(
            Heartbeat(
                battery_mv,
                battery_pct,
                -71,
                external_power=False,
                low_battery=battery_pct is not None and battery_pct < 15,
            )
        )
        await self._send(self.device_id, frame)

    async def _send_caller_ack(self, downlink_counter: int) -> None:
        _, reply = self._frame(CallerAck(downlink_counter))
        await self._send(self.device_id, reply)

    def received(self, frame: Frame) -> None:
        """A downlink frame addressed to this caller."""
        if frame.type.uplink:
            return
        if not verify_mac(frame, self._key) or frame.counter <= self._counters.last_down(
            self.device_id
        ):
            self.rejected_downlink += 1
            return
        self._counters.set_down(self.device_id, frame.counter)
        msg = frame.message
        if isinstance(msg, Ack):
            event = self._waiting.get(msg.acked_counter)
            if event is not None:
                event.set()
        elif isinstance(msg, Feedback):
            self.state = msg.state
            self.led = (msg.led_color, msg.led_pattern)
            if self._press_lock.locked():
                # SPEC.md 10.2 rule 3: nothing else goes out while a press waits.
                self._held_caller_ack = frame.counter
            else:
                task = asyncio.get_running_loop().create_task(
                    self._send_caller_ack(frame.counter)
                )
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            if self._on_feedback is not None:
                self._on_feedback(self, msg)


class SerialBus:
    """Many simulated callers on one serial port, as on an RS-485 bus."""

    def __init__(self, port: str, baudrate: int = 9600) -> None:
        self.port = port
        self.baudrate = baudrate
        self.callers: dict[int, SimCaller] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SerialBus:
        import serial_asyncio_fast

        reader, self._writer = await serial_asyncio_fast.open_serial_connection(
            url=self.port, baudrate=self.baudrate
        )
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader_task:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        while True:
            data = await reader.read(4096)
            if not data:
                return
            for item in decoder.feed(data):
                if isinstance(item, Frame):
                    caller = self.callers.get(item.device_id)
                    if caller is not None:
                        caller.received(item)

    async def send(self, device_id: int, frame: bytes) -> None:
        assert self._writer is not None
        self._writer.write(frame)
        await self._writer.drain()


class MqttBus:
    """Simulated callers reaching the broker.  One connection carries them all.

    A lost connection is made again, as a caller's firmware does.  A frame sent
    while it is down is lost, like one sent out of radio range; the press's own
    repetition brings it through once the broker is back.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        will_for: int | None = None,
        reconnect_s: float = 0.5,
    ) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.callers: dict[int, SimCaller] = {}
        self._will_for = will_for
        self._reconnect_s = reconnect_s
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self.connections = 0
        self.send_failures = 0  # frames lost because the broker was out of reach

    def _new_client(self) -> Any:
        import socket

        import aiomqtt

        will = None
        if self._will_for is not None:
            will = aiomqtt.Will(
                f"{self.prefix}/caller/{self._will_for}/status", b"offline", qos=1, retain=True
            )
        client = aiomqtt.Client(
            self.host,
            self.port,
            will=will,
            timeout=10,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_queued_outgoing_messages=100_000,
        )
        # --many and the benchmarks keep hundreds of presses in flight on purpose.
        client.pending_calls_threshold = 100_000
        return client

    async def _subscribe(self, client: Any) -> None:
        # A clean session each time: the subscriptions are made on every connection.
        if len(self.callers) > 50:
            await client.subscribe(f"{self.prefix}/caller/+/down", qos=1)
        else:
            for device_id in self.callers:
                await client.subscribe(f"{self.prefix}/caller/{device_id}/down", qos=1)
        if self._will_for is not None:
            await client.publish(
                f"{self.prefix}/caller/{self._will_for}/status", b"online", qos=1, retain=True
            )

    async def __aenter__(self) -> MqttBus:
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(first))
        try:
            # Reaching nobody at the start is an error to report, not to wait out.
            await first
        except BaseException:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            raise
        return self

    async def _run(self, first: asyncio.Future[None]) -> None:
        import aiomqtt

        while True:
            try:
                async with self._new_client() as client:
                    await self._subscribe(client)
                    self._client = client
                    self.connections += 1
                    if not first.done():
                        first.set_result(None)
                    async for message in client.messages:
                        self._deliver(message)
            except aiomqtt.MqttError as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
            finally:
                self._client = None
            await asyncio.sleep(self._reconnect_s)

    def _deliver(self, message: Any) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        item = decode_frame(bytes(payload))
        if isinstance(item, Frame):
            caller = self.callers.get(item.device_id)
            if caller is not None:
                caller.received(item)

    async def __aexit__(self, *exc: object) -> None:
        client = self._client
        if self._will_for is not None and client is not None:
            with contextlib.suppress(Exception):
                await client.publish(
                    f"{self.prefix}/caller/{self._will_for}/status", b"offline", qos=1, retain=True
                )
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send(self, device_id: int, frame: bytes) -> None:
        import aiomqtt

        client = self._client
        if client is None:
            self.send_failures += 1
            return
        try:
            # Not the acknowledgement the caller waits for, only the broker's
            # PUBACK: no reason to hold the press longer than its own repeat.
            await client.publish(f"{self.prefix}/caller/{device_id}/up", frame, qos=1, timeout=5)
        except aiomqtt.MqttError:
            self.send_failures += 1


# -- command line -------------------------------------------------------------------


def _load_callers(args: argparse.Namespace) -> tuple[dict[int, bytes], str]:
    from gateway.config import ConfigError, load_gateway_file, load_residents

    try:
        if args.config:
            gateway = load_gateway_file(args.config)
            residents = load_residents(gateway.residents_path)
            prefix = args.prefix or gateway.topic_prefix
        else:
            residents = load_residents(Path(args.residents))
            prefix = args.prefix or "onetouch/xiaowang"
    except ConfigError as exc:
        raise SystemExit(
            "cannot read the residents file:\n  " + "\n  ".join(exc.problems)
        ) from None
    return {c.id: c.key_bytes for c in residents.caller}, prefix


def _bus(args: argparse.Namespace, prefix: str, will_for: int | None = None) -> Any:
    if args.serial:
        return SerialBus(args.serial, args.baudrate)
    host, _, port = args.mqtt.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--mqtt wants HOST:PORT, got {args.mqtt!r}")
    return MqttBus(host, int(port), prefix, will_for=will_for)


def _show(caller: SimCaller, fb: Feedback) -> None:
    color, pattern = caller.led
    print(
        f"\r[caller {caller.device_id}] LED {color.name.lower()} {pattern.name.lower()}"
        f"  ({fb.state.name.lower().replace('_', ' ')})",
        flush=True,
    )


async def _one_press(args: argparse.Namespace, keys: dict[int, bytes], prefix: str) -> int:
    counters = CounterFile(Path(args.state_dir) / "counters.json")
    bus = _bus(args, prefix)
    caller = SimCaller(args.device, keys[args.device], counters, bus.send)
    bus.callers[args.device] = caller
    async with bus:
        result = await caller.press(KEY_NAMES[args.key], give_up_s=args.timeout)
    if result.acked:
        print(
            f"caller {args.device}: {args.key} acknowledged (counter {result.counter}, "
            f"{result.attempts} transmission(s), {result.latency_s * 1000:.1f} ms)"
        )
        return 0
    print(
        f"caller {args.device}: {args.key} NOT acknowledged after {args.timeout:.0f} s "
        f"({result.attempts} transmissions); is the gateway running and on this "
        f"{'port' if args.serial else 'broker'}?",
        file=sys.stderr,
    )
    return 1


async def _interactive(args: argparse.Namespace, keys: dict[int, bytes], prefix: str) -> int:
    import termios
    import tty

    counters = CounterFile(Path(args.state_dir) / "counters.json")
    bus = _bus(args, prefix, will_for=args.device)
    caller = SimCaller(args.device, keys[args.device], counters, bus.send, on_feedback=_show)
    bus.callers[args.device] = caller
    mapping = {
        "g": Key.CALL,
        "1": Key.CALL,
        "r": Key.HANGUP,
        "2": Key.HANGUP,
        "u": Key.UP,
        "3": Key.UP,
        "d": Key.DOWN,
        "4": Key.DOWN,
    }
    print(
        f"caller {args.device}: g = green (call)  r = red (hang up)  "
        "u = thumbs up  d = thumbs down  q = quit"
    )
    loop = asyncio.get_running_loop()
    keys_in: asyncio.Queue[str] = asyncio.Queue()
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if sys.stdin.isatty() else None
    if old is not None:
        tty.setcbreak(fd)
    loop.add_reader(fd, lambda: keys_in.put_nowait(os.read(fd, 1).decode(errors="ignore")))
    pending: set[asyncio.Task[Any]] = set()

    async def do(key: Key) -> None:
        r = await caller.press(key)
        print(
            f"\r[caller {args.device}] {key.name.lower()} acknowledged "
            f"({r.latency_s * 1000:.0f} ms)",
            flush=True,
        )

    try:
        async with bus:

            async def beat() -> None:
                while True:
                    await caller.heartbeat()
                    await asyncio.sleep(args.heartbeat)

            hb = asyncio.create_task(beat())
            while True:
                ch = await keys_in.get()
                if ch in ("q", "", "\x04"):
                    break
                if ch.lower() in mapping:
                    t = asyncio.create_task(do(mapping[ch.lower()]))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
            hb.cancel()
    finally:
        loop.remove_reader(fd)
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        counters.flush()
    return 0


def _write_press_log(path: Path, results: list[PressResult]) -> None:
    """Which presses, not only how many: one JSON line each, so a test can look
    for every acknowledged press at the far end."""
    lines = [
        json.dumps(
            {
                "device": r.device_id,
                "counter": r.counter,
                "key": r.key.name.lower(),
                "acked": r.acked,
                "attempts": r.attempts,
                "sent_at": r.sent_at,
                "done_at": r.done_at,
            }
        )
        for r in results
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


async def _many(args: argparse.Namespace, keys: dict[int, bytes], prefix: str) -> int:
    ids = sorted(keys)[: args.many]
    if len(ids) < args.many:
        raise SystemExit(f"--many {args.many}: the residents file has only {len(ids)} callers")
    counters = CounterFile(Path(args.state_dir) / "counters.json")
    bus = _bus(args, prefix)
    callers = {d: SimCaller(d, keys[d], counters, bus.send) for d in ids}
    bus.callers.update(callers)
    results: list[PressResult] = []
    rng = random.Random()
    async with bus:
        stop_at = time.monotonic() + args.duration
        tasks: set[asyncio.Task[Any]] = set()

        async def press(c: SimCaller) -> None:
            results.append(await c.press(rng.choice(list(Key)), give_up_s=args.timeout))

        async def beats() -> None:
            while True:
                for c in callers.values():
                    await c.heartbeat()
                    await asyncio.sleep(args.heartbeat / len(callers))

        # SIGTERM or Ctrl-C ends the load early, yet each press already made
        # is still seen through to its acknowledgement before the summary.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        hb = asyncio.create_task(beats()) if args.heartbeat > 0 else None
        while time.monotonic() < stop_at:
            pause = rng.expovariate(args.rate) if args.rate > 0 else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)
            if stopping.is_set():
                break
            if args.rate > 0:
                t = asyncio.create_task(press(callers[rng.choice(ids)]))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        if hb:
            hb.cancel()
    counters.flush()
    if args.press_log:
        _write_press_log(Path(args.press_log), results)
    acked = [r for r in results if r.acked]
    lat = sorted(r.latency_s * 1000 for r in acked)
    summary = {
        "callers": len(ids),
        "presses": len(results),
        "acknowledged": len(acked),
        "not_acknowledged": len(results) - len(acked),
        "retransmissions": sum(c.retransmissions for c in callers.values()),
        "send_failures": getattr(bus, "send_failures", 0),
        "latency_ms_median": round(statistics.median(lat), 2) if lat else None,
        "latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if len(acked) == len(results) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.caller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the gateway's gateway.toml (gives residents and topics)")
    src.add_argument("--residents", help="a residents file, when there is no gateway.toml")
    p.add_argument("--prefix", help="MQTT topic prefix (default: from --config)")
    link = p.add_mutually_exclusive_group(required=True)
    link.add_argument("--serial", metavar="PORT", help="serial port, e.g. /dev/pts/3")
    link.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker")
    p.add_argument("--baudrate", type=int, default=9600)
    p.add_argument("--device", type=int, help="caller id from the residents file")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--key", choices=sorted(KEY_NAMES), help="send one press and exit")
    mode.add_argument("--interactive", action="store_true", help="keyboard-driven caller")
    mode.add_argument("--many", type=int, metavar="N", help="drive N callers for load")
    p.add_argument("--rate", type=float, default=1.0, help="--many: presses per second, total")
    p.add_argument("--duration", type=float, default=10.0, help="--many: seconds to run")
    p.add_argument("--heartbeat", type=float, default=300.0, help="seconds between heartbeats")
    p.add_argument("--timeout", type=float, default=15.0, help="give up on a press after this")
    p.add_argument(
        "--press-log", metavar="PATH", help="--many: write every press (JSON lines) to PATH"
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("ONETOUCH_SIM_STATE", ".sim-state"),
        help="where frame counters persist (default .sim-state)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys, prefix = _load_callers(args)
    if args.many is None:
        if args.device is None:
            raise SystemExit("--device is required with --key and --interactive")
        if args.device not in keys:
            raise SystemExit(f"caller {args.device} is not in the residents file")
    try:
        if args.key:
            return asyncio.run(_one_press(args, keys, prefix))
        if args.interactive:
            return asyncio.run(_interactive(args, keys, prefix))
        return asyncio.run(_many(args, keys, prefix))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"cannot reach the gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
