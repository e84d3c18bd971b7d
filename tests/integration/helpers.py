"""Test-side devices that speak raw frames, so a test controls every byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import serial_asyncio_fast

from firmware_protocol import Ack, Frame, FrameDecoder, Message, encode
from gateway.config import load
from gateway.metrics import Metrics
from gateway.runtime import Gateway

from ..conftest import REPO

RESIDENTS = REPO / "config" / "residents.toml"


def caller_key(device_id: int) -> bytes:
    from gateway.config import load_residents

    return load_residents(RESIDENTS).by_id()[device_id].key_bytes


def frame(message: Message, device_id: int, counter: int, key: bytes | None = None) -> bytes:
    return encode(
        message,
        device_id=device_id,
        counter=counter,
        key=key if key is not None else caller_key(device_id),
    )


@contextlib.asynccontextmanager
async def running_gateway(config: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(load(config), metrics=Metrics())
    task = asyncio.create_task(gateway.run())
    ready = asyncio.create_task(gateway.ready.wait())
    done, _ = await asyncio.wait([task, ready], timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raise what made it stop
    assert ready in done, "gateway did not become ready"
    try:
        yield gateway
    finally:
        gateway.stop_requested.set()
        await asyncio.wait_for(task, 15)


class SerialDevice:
    """The far end of the bus: writes raw bytes, collects decoded downlink frames."""

    def __init__(self, port: Path) -> None:
        self.port = port
        self.frames: list[Frame] = []
        self._new = asyncio.Condition()
        self._writer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SerialDevice:
        reader, self._writer = await serial_asyncio_fast.open_serial_connection(
            url=str(self.port), baudrate=9600
        )
        self._task = asyncio.create_task(self._read(reader))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(4096):
            got = [i for i in decoder.feed(data) if isinstance(i, Frame)]
            if got:
                async with self._new:
                    self.frames.extend(got)
                    self._new.notify_all()

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def acks_for(
        self, device_id: int, counter: int, n: int = 1, timeout: float = 5.0
    ) -> list[Frame]:
        return await _wait_acks(self, device_id, counter, n, timeout)


class MqttDevice:
    """A raw MQTT client publishing frames on caller topics."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix
        self.frames: list[Frame] = []
        self._new = asyncio.Condition()
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttDevice:
        self.client = await self._stack.enter_async_context(
            aiomqtt.Client("127.0.0.1", self.port, timeout=10)
        )
        await self.client.subscribe(f"{self.prefix}/caller/+/down", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self._stack.aclose()

    async def _read(self) -> None:
        decoder = FrameDecoder()
        async for message in self.client.messages:
            got = [i for i in decoder.feed(message.payload) if isinstance(i, Frame)]
            if got:
                async with self._new:
                    self.frames.extend(got)
                    self._new.notify_all()

    async def publish(self, device_id: int | str, payload: bytes) -> None:
        await self.client.publish(f"{self.prefix}/caller/{device_id}/up", payload, qos=1)

    async def acks_for(
        self, device_id: int, counter: int, n: int = 1, timeout: float = 5.0
    ) -> list[Frame]:
        return await _wait_acks(self, device_id, counter, n, timeout)


def _acks(dev: Any, device_id: int, counter: int) -> list[Frame]:
    return [
        f
        for f in dev.frames
        if f.device_id == device_id
        and isinstance(f.message, Ack)
        and f.message.acked_counter == counter
    ]


async def _wait_acks(dev: Any, device_id: int, counter: int, n: int, timeout: float) -> list[Frame]:
    async def wait() -> list[Frame]:
        async with dev._new:
            await dev._new.wait_for(lambda: len(_acks(dev, device_id, counter)) >= n)
        return _acks(dev, device_id, counter)

    try:
        return await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        got = len(_acks(dev, device_id, counter))
        raise AssertionError(
            f"expected {n} acknowledgement(s) of caller {device_id} counter {counter}, got {got}"
        ) from None


async def wait_until(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
