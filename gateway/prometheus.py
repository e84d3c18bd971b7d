"""A Prometheus text endpoint on loopback, served from the event loop.

prometheus_client formats; the serving is a few lines of asyncio so the
figures are read on the loop that changes them, never from a second thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .log import get_logger
from .metrics import Metrics

__all__ = ["MetricsServer"]

log = get_logger("gateway.prometheus")

_HELP = {
    "gateway_presses_total": "Key presses stored, by key.",
    "gateway_rejected_frames_total": "Frames and bytes rejected, by reason and link.",
    "gateway_notifications_total": "Attempts to reach a person, by channel and outcome.",
    "gateway_time_to_accept_seconds": "From a case opening to a person accepting it.",
    "gateway_cases": "Cases the desk holds, by state.",
    "gateway_callers_offline": "Callers reported offline (silent past their allowance).",
    "gateway_backlog_records": "Records waiting to be sent to the district.",
}


class _Bridge:
    def __init__(self, metrics: Metrics, extra: Callable[[], dict[str, Any]]) -> None:
        self._metrics = metrics
        self._extra = extra

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.snapshot()
        for name, series in sorted(snap.items()):
            labels = sorted({k for key in series for k, _ in key})
            help_text = _HELP.get(name, name.replace("_", " "))
            family: Any
            if name in self._metrics.gauge_names():
                family = GaugeMetricFamily(name, help_text, labels=labels)
            else:
                family = CounterMetricFamily(name, help_text, labels=labels)
            for key, value in series.items():
                d = dict(key)
                family.add_metric([d.get(label, "") for label in labels], value)
            yield family
        for name, (buckets, total, count) in self._metrics.histograms().items():
            h = HistogramMetricFamily(name, _HELP.get(name, name))
            cumulative = []
            running = 0
            for bound, n in buckets:
                running += n
                cumulative.append((str(bound), running))
            cumulative.append(("+Inf", count))
            h.add_metric([], cumulative, total)
            yield h
        for name, value in self._extra().items():
            if isinstance(value, dict):
                labels = ["state"]
                g = GaugeMetricFamily(name, _HELP.get(name, name), labels=labels)
                for state, n in sorted(value.items()):
                    g.add_metric([state], n)
                yield g
            elif value is not None:
                yield GaugeMetricFamily(name, _HELP.get(name, name), value=value)


class MetricsServer:
    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        extra: Callable[[], dict[str, Any]] = dict,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Bridge(metrics, extra))  # type: ignore[arg-type]
        self._host, self._port = host, port
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        log.info("metrics endpoint", url=f"http://{self._host}:{self.bound_port}/metrics")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] != b"/metrics":
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            else:
                if self._refresh is not None:
                    await self._refresh()
                body = generate_latest(self._registry)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                    b"charset=utf-8\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()
