"""deploy/systemd/: the units' notify, watchdog, restart and hardening settings, their ExecStart through the live
CLI with the example config and environment files, and `systemd-analyze verify` where systemd is installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import parse_duration
from tests.deploy.deployfiles import (
    DEPLOY,
    Checked,
    check_command,
    known_env_names,
    parse_unit,
    read_env_file,
    unit_values,
)

SYSTEMD = DEPLOY / "systemd"
UNITS = {"run": SYSTEMD / "litefs-sidecar.service", "serve": SYSTEMD / "litefs-sidecar-server.service"}
ETC = Path("/etc/litefs-sidecar")
# The README installs every example file of deploy/systemd/ under /etc/litefs-sidecar/ by name.
INSTALLED = {str(ETC / p.name): p for p in SYSTEMD.iterdir() if p.suffix in (".toml", ".env")}

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures":
    "native",
}


def one(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> str:
    values = unit_values(unit, section, key)
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def exec_start(command: str) -> Checked:
    unit = parse_unit(UNITS[command])
    words = shlex.split(one(unit, "ExecStart"))
    assert Path(words[0]).is_absolute() and Path(words[0]).name == "litefs-sidecar"
    (env_file,) = unit_values(unit, "Service", "EnvironmentFile")
    env = read_env_file(INSTALLED[env_file.lstrip("-")])
    return check_command(words[1:], env, INSTALLED)


@pytest.mark.parametrize("command", sorted(UNITS))
class TestUnits:
    """Both units: Type=notify with a watchdog, a restart policy, an environment file and hardening."""

    def test_exec_start_parses_and_its_config_loads(self, command: str) -> None:
        checked = exec_start(command)
        assert checked.command == command
        assert checked.config is not None

    def test_notify_with_watchdog(self, command: str) -> None:
        unit = parse_unit(UNITS[command])
        assert one(unit, "Type") == "notify"
        assert one(unit, "NotifyAccess") == "main"
        assert parse_duration(one(unit, "WatchdogSec")) > 0

    def test_restarts_on_failure(self, command: str) -> None:
        assert one(parse_unit(UNITS[command]), "Restart") == "on-failure"

    def test_stop_timeout_is_above_twice_the_shutdown_grace(self, command: str) -> None:
        cfg = exec_start(command).config
        assert cfg is not None
        grace = cfg.sidecar.shutdown_grace if command == "run" else cfg.server.shutdown_grace
        # The grace, then the final flush to the store within the grace again (Engine.close(within=)).
        assert parse_duration(one(parse_unit(UNITS[command]), "TimeoutStopSec")) > 2 * grace

    def test_environment_file_is_under_etc_with_an_example_here(self, command: str) -> None:
        (env_file,) = unit_values(parse_unit(UNITS[command]), "Service", "EnvironmentFile")
        path = Path(env_file.lstrip("-"))
        assert path.parent == ETC and path.suffix == ".env"
        example = INSTALLED[str(path)]
        names = {k for k in read_env_file(example) if k.startswith("LITEFS_SIDECAR_")}
        assert names and names <= known_env_names()

    def test_hardening(self, command: str) -> None:
        unit = parse_unit(UNITS[command])
        for key, want in HARDENING.items():
            assert one(unit, key) == want, key
        filters = unit_values(unit, "Service", "SystemCallFilter")
        assert "@system-service" in filters
        assert unit_values(unit, "Service", "ReadWritePaths")

    def test_writes_only_where_its_config_points(self, command: str) -> None:
        cfg = exec_start(command).config
        assert cfg is not None
        unit = parse_unit(UNITS[command])
        writable = [Path(p) for v in unit_values(unit, "Service", "ReadWritePaths") for p in v.split()]
        writable += [Path("/var/lib") / d for v in unit_values(unit, "Service", "StateDirectory") for d in v.split()]
        wanted = [cfg.sidecar.data_dir, cfg.sidecar.state_dir] if command == "run" else [cfg.engine.state_dir]
        for path in wanted:
            assert any(path.is_relative_to(w) for w in writable), f"{path} is read-only under ProtectSystem=strict"


class TestSidecarUnit:
    """litefs-sidecar.service runs beside LiteFS."""

    def test_checks_the_litefs_config_litefs_reads(self) -> None:
        cfg = exec_start("run").config
        assert cfg is not None
        assert cfg.sidecar.litefs_config == Path("/etc/litefs.yml")  # the last place LiteFS looks, the usual one

    def test_starts_after_litefs_and_with_it(self) -> None:
        unit = parse_unit(UNITS["run"])
        assert "litefs.service" in " ".join(unit_values(unit, "Unit", "After")).split()
        assert "litefs.service" in " ".join(unit_values(unit, "Install", "WantedBy")).split()


class TestSystemdAnalyze:
    """`systemd-analyze verify` accepts both units."""

    def test_verify(self, tmp_path: Path) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            pytest.skip("systemd-analyze is not installed here; the static checks above still ran")
        # ExecStart must name an executable that exists on this machine, and litefs.service must be loadable.
        stub = tmp_path / "litefs-sidecar"
        stub.write_text(f"#!{sys.executable}\n")
        stub.chmod(0o755)
        names = []
        for path in UNITS.values():
            unit = path.read_text()
            binary = shlex.split(one(parse_unit(path), "ExecStart"))[0]
            (tmp_path / path.name).write_text(unit.replace(binary, str(stub)))
            names.append(str(tmp_path / path.name))
        (tmp_path / "litefs.service").write_text("[Unit]\nDescription=LiteFS\n[Service]\nExecStart=/bin/true\n")
        proc = subprocess.run([analyze, "verify", *names], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "litefs-sidecar" in line]
        assert ours == [], ours
