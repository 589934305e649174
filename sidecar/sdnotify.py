"""A client of systemd's notify protocol (sd_notify(3)): readiness, stopping, status and the watchdog.

Under `Type=notify`, systemd passes the address of a unix datagram socket in NOTIFY_SOCKET: an absolute
path, or `@name` for the abstract namespace. A service sends newline-separated `KEY=VALUE` assignments
to it, one datagram per message:

    notifier = Notifier.from_env()
    notifier.notify("READY=1", "STATUS=serving on http://127.0.0.1:20203")   # once listening
    await notifier.watchdog(stop)                                           # WATCHDOG=1 until `stop`
    notifier.notify("STOPPING=1")                                           # when a stop begins

With `WatchdogSec=`, systemd sets WATCHDOG_USEC (and WATCHDOG_PID, the process it watches); `watchdog()`
then sends WATCHDOG=1 every WATCHDOG_USEC/2 from the event loop, so a loop that hangs stops the pings and
systemd restarts the service. Without NOTIFY_SOCKET every call is a no-op, so callers never check.

Notifications are advisory: a send that fails (the manager went away, its queue is full) returns False
and never raises. Sends never block the event loop: the socket is non-blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Notifier:
    """Where to send notifications (None: nowhere) and how often to ping the watchdog (None: never)."""

    address: str | bytes | None = None  # a path, or b"\0name" for the abstract namespace
    watchdog_interval: float | None = None  # seconds between WATCHDOG=1: half of WATCHDOG_USEC

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, pid: int | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; ValueError if one is malformed.

        The watchdog is enabled only when WATCHDOG_USEC is set and WATCHDOG_PID is absent or equals
        `pid` (default: this process), as sd_watchdog_enabled(3) does.
        """
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw.startswith("@"):
            address = b"\0" + raw[1:].encode()  # the abstract namespace: a leading NUL byte
        elif raw.startswith("/"):
            address = raw
        elif raw:
            raise ValueError(f"NOTIFY_SOCKET={raw!r}: want an absolute path or @abstract-name")
        interval = None
        usec = env.get("WATCHDOG_USEC", "")
        watched = env.get("WATCHDOG_PID", "")
        if usec:
            if not usec.isdigit() or int(usec) == 0:
                raise ValueError(f"WATCHDOG_USEC={usec!r}: want a positive number of microseconds")
            if watched and not watched.isdigit():
                raise ValueError(f"WATCHDOG_PID={watched!r}: want a process ID")
            if not watched or int(watched) == (os.getpid() if pid is None else pid):
                interval = int(usec) / 2 / 1e6
        return cls(address, interval if address is not None else None)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send `states` ("READY=1", "STATUS=…") as one message; True if it was sent.

        A state must not contain a newline: that is what separates them. False when disabled or when
        the send failed; a failed notification is not worth stopping a service for.
        """
        for state in states:
            if "\n" in state or "=" not in state:
                raise ValueError(f"notify state {state!r}: want KEY=VALUE on one line")
        if self.address is None or not states:
            return False
        message = "\n".join(states).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message, self.address)
            except OSError:  # no listener, queue full (EAGAIN), permission: the manager's problem, not ours
                return False
        return True

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Send WATCHDOG=1 now and every `watchdog_interval` until `stop` is set; return at once if disabled."""
        if self.watchdog_interval is None:
            return
        while not stop.is_set():
            self.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.watchdog_interval)


def notify(*states: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `states` to the socket in NOTIFY_SOCKET, if any: `notify("READY=1")`. See `Notifier.notify`."""
    return Notifier.from_env(env).notify(*states)


__all__ = ["Notifier", "notify"]
