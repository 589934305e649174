"""`litefs-sidecar serve` as a real process: configuration from file, env and flags; systemd notifications."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.server.conftest import ADMIN, BASE_ENV, OTHER, SNAPSHOT, TOKEN, post, serving, wait_until


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, standing in for systemd's NOTIFY_SOCKET."""
    name = f"litefs-sidecar-serve-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        yield sock, "@" + name


async def received(sock: socket.socket) -> str:
    return (await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 60)).decode()


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], capture_output=True, text=True,
                          env={**BASE_ENV, **(env or {})}, timeout=60)


class TestConfiguration:
    async def test_file_env_and_flags_reach_the_running_server(self, tmp_path: Path) -> None:
        """Each setting takes its latest source: the file, then the environment, then flags."""
        (tmp_path / "tokens").write_text(f"# cluster token\ndefault {TOKEN}\n")
        config = tmp_path / "sidecar.toml"
        config.write_text(f'[server]\naddr = "127.0.0.1:1"\nstorage = "file://{tmp_path}/store"\n'
                          'max_body_size = "100"\n'
                          f'[engine]\nl0_interval = "1h"\nstate_dir = "{tmp_path}/state"\n'
                          '[log]\nformat = "json"\n')
        env = {"LITEFS_SIDECAR_SERVER_MAX_BODY_SIZE": "200", "LITEFS_SIDECAR_ENGINE_L0_INTERVAL": "100ms",
               "LITEFS_SIDECAR_SERVER_TOKENS": f"other {OTHER}", "LITEFS_SIDECAR_SERVER_ADMIN_TOKEN": ADMIN}
        async with serving(tmp_path, "--config", str(config), "--addr", "127.0.0.1:0", "--max-body-size", "1MiB",
                           "--tokens", str(tmp_path / "tokens"), env=env) as served, aiohttp.ClientSession() as http:
            assert served.url != "http://127.0.0.1:1"  # the flag's addr, not the file's
            # max_body_size: the flag's 1 MiB, not the environment's 200 bytes or the file's 100.
            assert (await post(http, served.url, "app.db", SNAPSHOT))[0] == 200
            assert (await post(http, served.url, "app.db", SNAPSHOT, OTHER))[0] == 200  # env tokens too

            async def flushed() -> bool:  # l0_interval: the environment's 100 ms, not the file's hour
                async with http.get(f"{served.url}/api/databases", params={"cluster": "default"},
                                    headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                    [db] = (await resp.json())["clusters"][0]["databases"]
                    return bool(db["lag"] == 0)
            await wait_until(flushed)
            assert await served.stop() == 0
        [loaded] = [e for e in served.logs() if e["event"] == "config_loaded"]
        assert loaded["settings"] == {
            "engine.l0_interval": "0.1 (env LITEFS_SIDECAR_ENGINE_L0_INTERVAL)",
            "engine.state_dir": f"{tmp_path}/state (file {config})",
            "log.format": f"json (file {config})",
            "server.addr": "127.0.0.1:0 (flag --addr)",
            "server.admin_token": "<secret> (env LITEFS_SIDECAR_SERVER_ADMIN_TOKEN)",
            "server.max_body_size": "1048576 (flag --max-body-size)",
            "server.storage": f"file://{tmp_path}/store (file {config})",
            "server.tokens": "<secret> (env LITEFS_SIDECAR_SERVER_TOKENS)",
            "server.tokens_file": f"{tmp_path}/tokens (flag --tokens-file)",
        }
        assert ADMIN not in served.stderr.read_text() and OTHER not in served.stderr.read_text()

    def test_a_bad_configuration_names_every_problem_and_exits_2(self, tmp_path: Path) -> None:
        """File, environment, flags, tokens, storage and the notify socket are checked before anything starts."""
        config = tmp_path / "sidecar.toml"
        config.write_text('[engine]\nl0_interval = "soon"\n[log]\nlevel = "loud"\n')
        (tmp_path / "tokens").write_text("default short\n")
        env = {"LITEFS_SIDECAR_ENGINE_S3_FORCE_PATH_STYLE": "perhaps", "NOTIFY_SOCKET": "relative/socket"}
        proc = run_serve("--config", str(config), "--tokens-file", str(tmp_path / "tokens"), "--storage",
                         "file://host/x", "--l1-retention", "forever", env=env)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            "litefs-sidecar: invalid configuration:",
            f'  engine.l0_interval = "soon" (from file {config}): not a duration (examples: 500ms, 1s, 10m)',
            '  engine.l1_retention = "forever" (from flag --l1-retention): not a duration (examples: 500ms, 1s, 10m)',
            '  engine.s3_force_path_style = "perhaps" (from env LITEFS_SIDECAR_ENGINE_S3_FORCE_PATH_STYLE): '
            "not a boolean (true/false, yes/no, 1/0)",
            f'  log.level = "loud" (from file {config}): must be one of debug, info, warning, error',
            f"  server.tokens_file (from flag --tokens-file): {tmp_path / 'tokens'}: line 1: token for cluster "
            "'default' is shorter than 16 characters",
            "  NOTIFY_SOCKET='relative/socket': want an absolute path or @abstract-name",
            "  server.storage (from flag --storage): storage URL 'file://host/x': file URLs look like "
            "file:///absolute/path",
        ]

    def test_unknown_and_misplaced_settings_are_named_together(self, tmp_path: Path) -> None:
        """Typos in the file and the environment, and a secret in the file, come out in one run."""
        config = tmp_path / "sidecar.toml"
        config.write_text('[server]\nadr = "127.0.0.1:20203"\nadmin_token = "in-a-file"\n[engnie]\n')
        proc = run_serve("--config", str(config), env={"LITEFS_SIDECAR_SERVR_ADDR": "x"})
        assert proc.returncode == 2
        assert proc.stderr.splitlines()[1:] == [
            f"  server.adr (from file {config}): unknown key; did you mean addr?",
            f"  server.admin_token (from file {config}): secrets are read only from the environment "
            "(LITEFS_SIDECAR_SERVER_ADMIN_TOKEN)",
            f"  engnie (from file {config}): unknown table; did you mean engine?",
            "  LITEFS_SIDECAR_SERVR_ADDR (from env): unknown variable; did you mean LITEFS_SIDECAR_SERVER_ADDR?",
        ]

    def test_a_tokens_file_not_in_utf8_is_a_configuration_error(self, tmp_path: Path) -> None:
        """A Latin-1 comment in the tokens file: exit 2 naming the file and the line, not a traceback."""
        tokens = tmp_path / "tokens"
        tokens.write_bytes(f"# caf\u00e9\ndefault {TOKEN}\n".encode("latin-1"))
        proc = run_serve("--tokens-file", str(tokens), "--storage", f"file://{tmp_path}/s",
                         "--state-dir", str(tmp_path / "st"))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[1:] == [
            f"  server.tokens_file = {str(tokens)!r} (from flag --tokens-file): not UTF-8: byte 0xe9 on line 1"]
        assert not (tmp_path / "st").exists()

    @pytest.mark.parametrize(("lines", "env", "problem"), [
        ([f"prod {TOKEN}", f"staging {OTHER}", f"staging {TOKEN}"], "",
         "server.tokens_file (from flag --tokens-file): {tokens}: line 3: token for cluster 'staging' is already "
         "line 1's, for cluster 'prod'"),
        ([f"prod {TOKEN}"], f"staging {OTHER}; staging {TOKEN}",
         "server.tokens (from env LITEFS_SIDECAR_SERVER_TOKENS): a token for cluster 'staging' is "
         "server.tokens_file's for cluster 'prod'"),
    ])
    def test_one_token_for_two_clusters_is_refused(self, lines: list[str], env: str, problem: str,
                                                   tmp_path: Path) -> None:
        """Else the last one wins, and the LiteFS nodes of one cluster back up into the other's."""
        tokens = tmp_path / "tokens"
        tokens.write_text("\n".join(lines) + "\n")
        proc = run_serve("--tokens-file", str(tokens), "--storage", f"file://{tmp_path}/s",
                         "--state-dir", str(tmp_path / "st"), env={"LITEFS_SIDECAR_SERVER_TOKENS": env})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[1:] == ["  " + problem.format(tokens=tokens)]
        assert not (tmp_path / "st").exists()

    def test_a_short_admin_token_is_refused(self, tmp_path: Path) -> None:
        """The admin token grants every cluster (and delete): it needs the 16 characters a cluster token needs."""
        proc = run_serve("--storage", f"file://{tmp_path}/s", "--state-dir", str(tmp_path / "st"),
                         env={"LITEFS_SIDECAR_SERVER_ADMIN_TOKEN": "admin"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[1:] == [
            "  server.admin_token (from env LITEFS_SIDECAR_SERVER_ADMIN_TOKEN): shorter than 16 characters"]
        assert not (tmp_path / "st").exists()

    def test_one_advertised_address_for_several_workers_is_refused(self, tmp_path: Path) -> None:
        """Each worker writes its address in its leases; with one for all, half the forwarded requests reached a
        worker that did not hold their cluster and got 503."""
        proc = run_serve("--storage", f"file://{tmp_path}/s", "--state-dir", str(tmp_path / "st"), "--workers", "2",
                         "--advertise-url", "http://127.0.0.1:20203",
                         env={"LITEFS_SIDECAR_SERVER_TOKENS": f"prod {TOKEN}"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[1:] == [
            "  server.advertise_url (from flag --advertise-url): one address cannot name each of the 2 workers "
            "(server.workers, from flag --workers), which forward to each other by it; leave it unset (each worker "
            "then advertises a loopback port of its own), or run one process per address"]
        assert not (tmp_path / "st").exists()

    def test_tokens_are_required_unless_auth_is_off(self, tmp_path: Path) -> None:
        """No token at all refuses to start, with the way out in the message."""
        proc = run_serve("--storage", f"file://{tmp_path}/s", "--state-dir", str(tmp_path / "st"))
        assert proc.returncode == 2 and "no tokens configured: give --tokens-file FILE" in proc.stderr

    def test_a_port_in_use_is_one_clear_line(self, tmp_path: Path) -> None:
        """Failing to listen exits 1 naming the address, not with a traceback."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            addr = f"127.0.0.1:{taken.getsockname()[1]}"
            proc = run_serve("--insecure-no-auth", "--addr", addr, "--storage", f"file://{tmp_path}/s",
                             "--state-dir", str(tmp_path / "st"))
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(f"litefs-sidecar: listen on {addr}: ")
        assert "Traceback" not in proc.stderr


class TestSystemd:
    async def test_ready_watchdog_and_stopping(self, tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
        """READY=1 once listening, WATCHDOG=1 while running, STOPPING=1 at SIGTERM, then a clean exit."""
        sock, address = notify_socket
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000",
               "LITEFS_SIDECAR_SERVER_TOKENS": f"default {TOKEN}"}
        async with serving(tmp_path, "--addr", "127.0.0.1:0", "--storage", f"file://{tmp_path}/s", "--state-dir",
                           str(tmp_path / "st"), "--log-format", "json", env=env) as served:
            messages = [await received(sock) for _ in range(4)]
            ready = [m for m in messages if m.startswith("READY=1")]
            assert ready == [f"READY=1\nSTATUS=serving on {served.url}"]
            assert messages.count("WATCHDOG=1") == 3
            assert await served.stop() == 0
            while (message := await received(sock)) == "WATCHDOG=1":
                pass
            assert message == "STOPPING=1\nSTATUS=stopping: finishing in-flight uploads"
        assert [e["event"] for e in served.logs()][-1] == "stopped"

    async def test_without_notify_socket_nothing_is_sent(self, tmp_path: Path) -> None:
        """Outside systemd the server runs and stops the same way."""
        env = {"LITEFS_SIDECAR_SERVER_TOKENS": f"default {TOKEN}"}
        async with serving(tmp_path, "--addr", "127.0.0.1:0", "--storage", f"file://{tmp_path}/s", "--state-dir",
                           str(tmp_path / "st"), env=env) as served:
            async with aiohttp.ClientSession() as http, http.get(f"{served.url}/readyz") as resp:
                assert resp.status == 200
            assert await served.stop() == 0
