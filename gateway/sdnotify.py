"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams.

Written out rather than imported: it is one datagram per call, and the unit's
watchdog depends on it, so it should have no moving parts of its own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@".
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self._watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the unit's WatchdogSec, as systemd advises."""
        return None if self._watchdog_s is None else self._watchdog_s / 2

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines; False if there is no socket or it failed."""
        if not self._address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall(message)
        except OSError:
            return False
        return True
