"""RS-485/UART link over pyserial's asyncio transport.

One port is one bus: many callers share it, each frame names its device.  A
port that disappears (a USB adapter pulled out) is reopened with backoff for
as long as the gateway runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import serial
import serial.rs485
import serial_asyncio_fast

from firmware_protocol import Frame, FrameDecoder, Rejected

from ..config import SerialLinkConfig
from ..log import get_logger
from ..metrics import Metrics
from ._backoff import Backoff
from ._types import Submit

__all__ = ["SerialLink"]

log = get_logger("gateway.links.serial")


class _Protocol(asyncio.Protocol):
    def __init__(self, link: SerialLink) -> None:
        self._link = link
        self._decoder = FrameDecoder()
        self._idle_timer: asyncio.TimerHandle | None = None
        # SPEC.md 13.1: 20 character times of silence end any frame; a floor
        # keeps scheduling jitter at high baud rates from cutting frames short.
        self._idle_s = max(0.010, 20 * 10 / link.config.baudrate)
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        try:
            items: list[Frame | Rejected] = self._decoder.feed(data)
        except Exception:  # the decoder should never raise; the reader must not die if it does
            self._decoder = FrameDecoder()
            self._link.metrics.inc("gateway_intake_errors_total", link=self._link.name)
            log.exception(
                "decoder failed; buffer reset", link=self._link.name, rate_key=self._link.name
            )
            return
        self._deliver(items)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._decoder.buffered:
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle_s, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        self._deliver(self._decoder.idle())

    def _deliver(self, items: list[Frame | Rejected]) -> None:
        for item in items:
            self._link.submit(item, self._link)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._deliver(list(self._decoder.flush()))
        if not self.closed.done():
            self.closed.set_result(exc)


class SerialLink:
    def __init__(self, config: SerialLinkConfig, submit: Submit, metrics: Metrics) -> None:
        self.config = config
        self.name = f"serial:{config.name}"
        self.submit = submit
        self.metrics = metrics
        self._transport: Any = None
        self.connected = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._transport is not None

    def send(self, device_id: int, frame: bytes) -> bool:
        transport = self._transport
        if transport is None:
            return False
        transport.write(frame)
        self.metrics.inc("gateway_downlink_frames_total", link=self.name)
        return True

    async def run(self) -> None:
        """Keep the port open until cancelled."""
        backoff = Backoff(self.config.reopen_min_s, self.config.reopen_max_s)
        loop = asyncio.get_running_loop()
        while True:
            protocol: _Protocol | None = None
            try:
                transport, protocol = await serial_asyncio_fast.create_serial_connection(
                    loop,
                    lambda: _Protocol(self),
                    self.config.port,
                    baudrate=self.config.baudrate,
                    exclusive=True,
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                delay = backoff.next()
                self.metrics.inc("gateway_link_open_failures_total", link=self.name)
                log.warning(
                    "serial port cannot be opened; retrying",
                    link=self.name,
                    port=self.config.port,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                    rate_key=self.name,
                )
                await asyncio.sleep(delay)
                continue
            assert protocol is not None
            if self.config.rs485:
                transport.serial.rs485_mode = serial.rs485.RS485Settings()
            self._transport = transport
            self.connected.set()
            backoff.reset()
            self.metrics.set("gateway_link_up", 1, link=self.name)
            log.info(
                "serial port open",
                link=self.name,
                port=self.config.port,
                baudrate=self.config.baudrate,
            )
            try:
                exc = await protocol.closed
            finally:
                self._transport = None
                self.connected.clear()
                self.metrics.set("gateway_link_up", 0, link=self.name)
                transport.close()
            self.metrics.inc("gateway_link_losses_total", link=self.name)
            log.warning(
                "serial port lost; reopening",
                link=self.name,
                port=self.config.port,
                error=str(exc) if exc else None,
            )
            await asyncio.sleep(backoff.next())
