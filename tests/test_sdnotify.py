"""The systemd notify protocol against a real unix datagram socket bound by the test, as systemd binds it."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.sdnotify import Notifier, notify


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, str]]:
    """A socket standing in for systemd's, at a short path (sun_path holds 108 bytes; tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as tmp:
        path = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(10)
            yield sock, path


@pytest.fixture
def abstract() -> Iterator[tuple[socket.socket, str]]:
    """A socket in the abstract namespace; NOTIFY_SOCKET names it with a leading '@'."""
    name = f"litefs-sidecar-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        yield sock, "@" + name


class TestNotify:
    def test_without_notify_socket_everything_is_a_no_op(self) -> None:
        """Unset NOTIFY_SOCKET: nothing is sent and the watchdog returns at once."""
        notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
        assert not notifier.enabled and notifier.watchdog_interval is None
        assert notifier.notify("READY=1") is False
        asyncio.run(notifier.watchdog(asyncio.Event()))
        assert notify("READY=1", env={}) is False

    def test_ready_and_status_arrive_as_one_datagram(self, manager: tuple[socket.socket, str]) -> None:
        """States are joined by newlines into one message on a path socket."""
        sock, path = manager
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.notify("READY=1", "STATUS=serving on http://127.0.0.1:20203")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving on http://127.0.0.1:20203"
        assert notify("STOPPING=1", env={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"STOPPING=1"

    def test_abstract_namespace(self, abstract: tuple[socket.socket, str]) -> None:
        """'@name' is the abstract socket whose address starts with a NUL byte."""
        sock, address = abstract
        assert notify("READY=1", env={"NOTIFY_SOCKET": address})
        assert sock.recv(4096) == b"READY=1"

    def test_a_missing_manager_is_not_an_error(self, tmp_path: Path) -> None:
        """A send that fails returns False rather than stopping the service."""
        assert Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify("READY=1") is False

    @pytest.mark.parametrize("state", ["READY", "STATUS=two\nlines"])
    def test_states_are_single_assignments(self, state: str) -> None:
        """A state without '=' or with a newline would corrupt the message."""
        with pytest.raises(ValueError, match="KEY=VALUE"):
            Notifier.from_env({}).notify(state)

    @pytest.mark.parametrize(("env", "why"), [
        ({"NOTIFY_SOCKET": "relative/path"}, "absolute path"),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}, "microseconds"),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, "microseconds"),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "me"}, "process ID"),
    ])
    def test_malformed_environment_is_refused(self, env: dict[str, str], why: str) -> None:
        """Malformed variables are named rather than silently ignored."""
        with pytest.raises(ValueError, match=why):
            Notifier.from_env(env)


class TestWatchdog:
    def test_interval_is_half_of_watchdog_usec(self) -> None:
        """WATCHDOG_USEC=30 s pings every 15 s."""
        assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0

    def test_another_process_is_being_watched(self) -> None:
        """WATCHDOG_PID of another process turns the watchdog off; our own pid keeps it on."""
        env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert Notifier.from_env(env).watchdog_interval is None
        env["WATCHDOG_PID"] = str(os.getpid())
        assert Notifier.from_env(env).watchdog_interval == 0.5

    async def test_pings_until_stopped(self, manager: tuple[socket.socket, str]) -> None:
        """WATCHDOG=1 is sent repeatedly, and the task ends once `stop` is set."""
        sock, path = manager
        sock.setblocking(False)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(notifier.watchdog(stop))
            for _ in range(3):
                assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 10) == b"WATCHDOG=1"
            stop.set()
        assert task.done() and task.exception() is None
