"""deploy/compose/docker-compose.yml: the services fit together (images, mounts, ports, bucket, tokens), the
`litefs-sidecar` commands parse with the live CLI and their mounted configs load, and LiteFS is set up for the
sidecar."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import parse_duration
from tests.deploy.deployfiles import (
    DEPLOY,
    Checked,
    check_command,
    check_litefs_schema,
    commands_in_shell,
    dockerfile,
    exec_form,
    go_duration,
    host_port,
    installed_files,
    interpolate,
    litefs_expand,
)

COMPOSE = DEPLOY / "compose"
FILE = COMPOSE / "docker-compose.yml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(FILE.read_text())
    return doc


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def environment(name: str) -> dict[str, str]:
    """A service's environment as the container sees it, with compose's ${VAR:-default} defaults."""
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v), {}) for k, v in env.items()}


def build_dockerfile(name: str) -> tuple[Path, Path]:
    build = service(name)["build"]
    context = (COMPOSE / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def mounted_files(name: str) -> dict[str, Path]:
    """Container path → file, for the service's bind mounts and the files its image installs."""
    context, path = build_dockerfile(name)
    files = installed_files(path, context)
    for volume in service(name).get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/")):
            files[rest.split(":")[0]] = (COMPOSE / source).resolve()
    return files


def command(name: str) -> Checked:
    """The service's `litefs-sidecar` command line: its image's entrypoint and its `command`."""
    _, path = build_dockerfile(name)
    entrypoint = [exec_form(i) for i in dockerfile(path) if i.keyword == "ENTRYPOINT"][-1]
    argv = entrypoint + list(service(name)["command"])
    assert argv[0] == "litefs-sidecar"
    return check_command(argv[1:], environment(name), mounted_files(name))


def node_litefs() -> dict[str, Any]:
    path = mounted_files("node")["/etc/litefs.yml"]
    doc: dict[str, Any] = yaml.safe_load(litefs_expand(path.read_text(), environment("node")))
    return doc


def node_sidecar() -> Checked:
    """`litefs-sidecar run` as litefs-exec (installed by the node image) starts it in the node container."""
    (argv,) = commands_in_shell(mounted_files("node")["/usr/local/bin/litefs-exec"].read_text())
    return check_command(argv, environment("node"), mounted_files("node"))


class TestServices:
    """The stack: MinIO and its bucket, the server, one LiteFS node."""

    def test_has_the_store_the_server_and_a_node(self) -> None:
        assert {"minio", "minio-init", "server", "node"} <= set(compose()["services"])

    def test_dependencies_name_services(self) -> None:
        services = compose()["services"]
        for name, svc in services.items():
            depends = svc.get("depends_on", [])
            assert set(depends) <= set(services), name

    def test_builds_and_bind_mounts_exist(self) -> None:
        built = [name for name, svc in compose()["services"].items() if "build" in svc]
        assert set(built) == {"server", "node"}
        for name in built:
            context, path = build_dockerfile(name)
            assert context.is_dir() and path.is_file(), name
            for dest, src in mounted_files(name).items():
                assert src.exists(), f"{name}: {dest} comes from {src}, which does not exist"

    def test_named_volumes_are_declared(self) -> None:
        doc = compose()
        for name, svc in doc["services"].items():
            for volume in svc.get("volumes", []):
                source = volume.split(":")[0]
                if not source.startswith((".", "/")):
                    assert source in doc.get("volumes", {}), f"{name}: volume {source} is not declared"

    def test_docker_compose_config_accepts_it(self) -> None:
        docker = shutil.which("docker")
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30) if docker else None
        if probe is None or probe.returncode != 0:
            pytest.skip("docker compose is not installed here; the structural checks in this file still ran")
        assert docker is not None
        proc = subprocess.run([docker, "compose", "-f", str(FILE), "config", "--quiet"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


class TestServer:
    """The `server` service: `litefs-sidecar serve` on MinIO."""

    def test_command_parses_and_its_mounted_config_loads(self) -> None:
        assert command("server").command == "serve"

    def test_stores_in_the_bucket_minio_init_creates(self) -> None:
        cfg = command("server").config
        assert cfg is not None
        bucket = cfg.server.storage.removeprefix("s3://").split("/")[0]
        script = " ".join(service("minio-init")["command"])
        assert re.search(rf"mc mb\b.*\blocal/{re.escape(bucket)}\b", script), script
        assert host_port(cfg.engine.s3_endpoint) == ("minio", 9000)
        assert cfg.engine.s3_force_path_style

    def test_has_minios_credentials_and_the_node_clusters_token(self) -> None:
        env = environment("server")
        assert env["AWS_ACCESS_KEY_ID"] == environment("minio")["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == environment("minio")["MINIO_ROOT_PASSWORD"]
        cfg = node_sidecar().config
        assert cfg is not None
        assert env["LITEFS_SIDECAR_SERVER_TOKENS"] == f"{cfg.sidecar.cluster} {cfg.sidecar.token}"

    def test_stops_within_the_grace_period(self) -> None:
        cfg = command("server").config
        assert cfg is not None
        assert 2 * cfg.server.shutdown_grace < parse_duration(service("server")["stop_grace_period"])

    def test_engine_state_is_on_a_volume(self) -> None:
        cfg = command("server").config
        assert cfg is not None
        mounts = [v.split(":")[1] for v in service("server")["volumes"] if not v.startswith(".")]
        assert any(cfg.engine.state_dir.is_relative_to(m) for m in mounts)


class TestNode:
    """The `node` service: LiteFS with FUSE, the example application and the sidecar."""

    def test_can_mount_fuse(self) -> None:
        node = service("node")
        assert any(d.split(":")[0] == "/dev/fuse" for d in node["devices"])
        assert "SYS_ADMIN" in node["cap_add"]

    def test_runs_litefs_as_the_main_process(self) -> None:
        _, path = build_dockerfile("node")
        assert [exec_form(i) for i in dockerfile(path) if i.keyword == "ENTRYPOINT"][-1] == ["litefs", "mount"]
        assert "command" not in service("node")

    def test_litefs_would_accept_its_config(self) -> None:
        assert check_litefs_schema(node_litefs()) == []

    def test_litefs_retention_is_off_and_there_is_no_backup_section(self) -> None:
        lf = node_litefs()
        assert go_duration(lf["data"]["retention"]) <= 0
        assert go_duration(lf["http"]["snapshot-timeout"]) > 0
        assert "backup" not in lf
        assert "LITEFS_CLOUD_TOKEN" not in environment("node")

    def test_the_sidecars_own_start_up_check_accepts_it(self) -> None:
        from sidecar.daemon import litefs_config

        cfg = node_sidecar().config
        assert cfg is not None
        path = mounted_files("node")[str(cfg.sidecar.litefs_config)]
        assert path == COMPOSE / "litefs.yml"
        assert litefs_config.check(path, env=environment("node")) == []

    def test_single_node_static_lease(self) -> None:
        lease = node_litefs()["lease"]
        assert lease["type"] == "static" and lease["candidate"] is True
        assert host_port(lease["advertise-url"])[0] == "node"

    def test_example_app_and_sidecar_run_from_litefs_exec(self) -> None:
        execs = node_litefs()["exec"]
        assert execs[-1]["cmd"].split()[:2] == ["litefs-exec", "python3"]
        assert "/app/example_app.py" in mounted_files("node")

    def test_sidecar_command_parses_and_its_mounted_config_loads(self) -> None:
        checked = node_sidecar()
        assert checked.command == "run"

    def test_sidecar_matches_litefs_and_ships_to_the_server(self) -> None:
        cfg = node_sidecar().config
        assert cfg is not None
        lf = node_litefs()
        assert cfg.sidecar.data_dir == Path(lf["data"]["dir"])
        assert cfg.sidecar.mount_dir == Path(lf["fuse"]["dir"])
        server = command("server").config
        assert server is not None
        assert host_port(cfg.sidecar.upstream) == ("server", host_port(server.server.addr)[1])

    def test_sidecar_data_and_state_are_on_volumes(self) -> None:
        cfg = node_sidecar().config
        assert cfg is not None
        mounts = [v.split(":")[1] for v in service("node")["volumes"] if not v.startswith(".")]
        assert str(cfg.sidecar.data_dir) in mounts
        assert any(cfg.sidecar.state_dir.is_relative_to(m) for m in mounts)

    def test_stops_within_the_grace_period(self) -> None:
        cfg = node_sidecar().config
        assert cfg is not None
        assert 2 * cfg.sidecar.shutdown_grace < parse_duration(service("node")["stop_grace_period"])
