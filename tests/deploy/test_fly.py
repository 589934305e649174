"""Fly.io: fly.toml (the LiteFS app), deploy/fly/ (its image, litefs.yml, sidecar config, litefs-exec) and the
backup server app, cross-checked against each other and against the real CLI and configuration loader."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import parse_duration
from sidecar.server.app import OPEN_PATHS
from tests.deploy.deployfiles import (
    DEPLOY,
    REPO,
    Checked,
    check_command,
    check_litefs_schema,
    commands_in_shell,
    dockerfile,
    exec_form,
    go_duration,
    host_port,
    installed_files,
    known_env_names,
    litefs_expand,
    secret_names,
)

FLY = DEPLOY / "fly"
# What Fly.io sets on every machine, for litefs.yml's ${…} expansion.
FLY_ENV = {"FLY_REGION": "ord", "FLY_ALLOC_ID": "3d8d9016b7e038", "FLY_APP_NAME": "litefs-sidecar-example",
           "FLY_CONSUL_URL": "https://consul.example/abc", "HOSTNAME": "3d8d9016b7e038"}
TOKEN = "0123456789abcdef0123456789abcdef"


def load_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def node_app() -> dict[str, Any]:
    return load_toml(REPO / "fly.toml")


def server_app() -> dict[str, Any]:
    return load_toml(FLY / "server.fly.toml")


def litefs_yml() -> dict[str, Any]:
    env = {**FLY_ENV, **node_app().get("env", {})}
    doc: dict[str, Any] = yaml.safe_load(litefs_expand((FLY / "litefs.yml").read_text(), env))
    return doc


def image_files() -> dict[str, Path]:
    return installed_files(REPO / node_app()["build"]["dockerfile"], REPO)


def sidecar_command() -> Checked:
    """The `litefs-sidecar run` that litefs-exec starts, loaded with the node app's env and secrets."""
    commands = commands_in_shell((FLY / "litefs-exec").read_text())
    assert len(commands) == 1, commands
    env = {**node_app().get("env", {}), "LITEFS_SIDECAR_TOKEN": TOKEN}
    return check_command(commands[0], env, image_files())


def server_command() -> Checked:
    """`litefs-sidecar serve` as server.fly.toml runs it: the image's entrypoint plus [processes], its env and
    the secrets its comments tell the user to set."""
    app = server_app()
    entrypoint = [exec_form(i) for i in dockerfile(REPO / "Dockerfile") if i.keyword == "ENTRYPOINT"][-1]
    assert entrypoint == ["litefs-sidecar"]
    (command,) = app["processes"].values()
    secrets = {"LITEFS_SIDECAR_SERVER_STORAGE": "s3://bucket/litefs",
               "LITEFS_SIDECAR_SERVER_TOKENS": f"prod {TOKEN}",
               "LITEFS_SIDECAR_SERVER_ADMIN_TOKEN": TOKEN[::-1]}
    assert secret_names((FLY / "server.fly.toml").read_text()) == set(secrets)
    return check_command(shlex.split(command), {**app["env"], **secrets})


class TestNodeApp:
    """fly.toml: LiteFS, the example application and the sidecar on every machine."""

    def test_builds_the_node_image_from_the_repository_root(self) -> None:
        app = node_app()
        path = REPO / app["build"]["dockerfile"]
        assert path.is_file()
        ins = dockerfile(path)
        assert [exec_form(i) for i in ins if i.keyword == "ENTRYPOINT"][-1] == ["litefs", "mount"]
        assert any(i.keyword == "COPY" and "--from=flyio/litefs:0.5" in i.flags for i in ins)
        for dest, src in installed_files(path, REPO).items():
            assert src.exists(), f"{path.name}: COPY {src.relative_to(REPO)} {dest}: no such file"

    def test_volume_holds_the_litefs_data_dir_and_the_sidecar_state(self) -> None:
        mount = Path(node_app()["mounts"]["destination"])
        cfg = sidecar_command().config
        assert cfg is not None
        assert Path(litefs_yml()["data"]["dir"]) == mount
        assert cfg.sidecar.data_dir == mount
        assert cfg.sidecar.state_dir.is_relative_to(mount), "the sidecar's state must survive a restart"

    def test_sidecar_stops_within_the_kill_timeout(self) -> None:
        cfg = sidecar_command().config
        assert cfg is not None
        assert 2 * cfg.sidecar.shutdown_grace < parse_duration(node_app()["kill_timeout"])

    def test_public_port_is_the_litefs_proxy_and_metrics_are_the_sidecars(self) -> None:
        app, lf = node_app(), litefs_yml()
        assert host_port(lf["proxy"]["addr"])[1] == app["http_service"]["internal_port"]
        cfg = sidecar_command().config
        assert cfg is not None
        assert host_port(cfg.sidecar.metrics_addr)[1] == app["metrics"]["port"]

    def test_litefs_backup_client_is_not_switched_on_by_the_environment(self) -> None:
        assert "LITEFS_CLOUD_TOKEN" not in node_app().get("env", {})
        assert "LITEFS_CLOUD_TOKEN" not in (REPO / "fly.toml").read_text()

    def test_secrets_the_readme_sets_are_settings(self) -> None:
        text = (FLY / "README.md").read_text() + (REPO / "fly.toml").read_text()
        assert secret_names(text) <= known_env_names()
        assert "LITEFS_SIDECAR_TOKEN" in secret_names(text)


class TestLiteFSConfig:
    """deploy/fly/litefs.yml: what LiteFS must do beside the sidecar."""

    def test_litefs_would_accept_it(self) -> None:
        assert check_litefs_schema(litefs_yml()) == []

    def test_retention_is_off_and_there_is_no_backup_section(self) -> None:
        lf = litefs_yml()
        assert go_duration(lf["data"]["retention"]) <= 0
        assert "backup" not in lf

    def test_snapshot_timeout_is_set_because_it_defaults_to_the_retention(self) -> None:
        assert go_duration(litefs_yml()["http"]["snapshot-timeout"]) > 0

    def test_candidates_follow_the_primary_region(self) -> None:
        assert litefs_yml()["lease"]["candidate"] is True  # FLY_REGION == PRIMARY_REGION
        other = yaml.safe_load(litefs_expand((FLY / "litefs.yml").read_text(),
                                             {**FLY_ENV, **node_app()["env"], "FLY_REGION": "ams"}))
        assert other["lease"]["candidate"] is False

    def test_last_exec_runs_the_app_and_the_sidecar_through_litefs_exec(self) -> None:
        execs = litefs_yml()["exec"]
        assert execs[-1]["cmd"].split()[0] == "litefs-exec"
        assert all(e.get("if-candidate") for e in execs[:-1]), "earlier entries block: migrations only"
        assert image_files()["/usr/local/bin/litefs-exec"] == FLY / "litefs-exec"
        assert (FLY / "litefs-exec").stat().st_mode & 0o111, "litefs-exec must be executable"

    def test_the_sidecars_own_start_up_check_accepts_it(self) -> None:
        from sidecar.daemon import litefs_config

        cfg = sidecar_command().config
        assert cfg is not None
        path = image_files()[str(cfg.sidecar.litefs_config)]
        assert path == FLY / "litefs.yml"
        assert litefs_config.check(path, env=node_app()["env"]) == []

    def test_sidecar_paths_match_litefs(self) -> None:
        lf = litefs_yml()
        cfg = sidecar_command().config
        assert cfg is not None
        assert cfg.sidecar.data_dir == Path(lf["data"]["dir"])
        assert cfg.sidecar.mount_dir == Path(lf["fuse"]["dir"])
        assert host_port(cfg.sidecar.litefs_url)[1] == host_port(lf["http"]["addr"])[1]
        app_db = Path(lf["fuse"]["dir"]) / lf["proxy"]["db"]
        assert all(f"--db {app_db}" in e["cmd"] for e in lf["exec"])


class TestSidecarCommand:
    """The `litefs-sidecar run` line in litefs-exec, through the live CLI and configuration loader."""

    def test_parses_and_loads_its_config(self) -> None:
        checked = sidecar_command()
        assert checked.command == "run"
        assert checked.argv[:2] == ["run", "--config"]

    def test_ships_to_the_backup_server_app_over_the_private_network(self) -> None:
        cfg = sidecar_command().config
        assert cfg is not None
        host, port = host_port(cfg.sidecar.upstream)
        assert host == f"{server_app()['app']}.internal"
        assert port == host_port(server_app()["env"]["LITEFS_SIDECAR_SERVER_ADDR"])[1]

    def test_cluster_is_one_the_server_has_a_token_for(self) -> None:
        cfg = sidecar_command().config
        assert cfg is not None
        # The server's tokens are a secret: the line that sets them is documented in server.fly.toml and the README.
        for path in (FLY / "server.fly.toml", FLY / "README.md"):
            assert f'LITEFS_SIDECAR_SERVER_TOKENS="{cfg.sidecar.cluster} $TOKEN"' in path.read_text(), path.name


class TestServerApp:
    """deploy/fly/server.fly.toml: `litefs-sidecar serve` with a volume and a Tigris bucket."""

    def test_command_parses_and_its_environment_loads(self) -> None:
        checked = server_command()
        assert checked.command == "serve"

    def test_listens_on_ipv6_for_the_private_network(self) -> None:
        cfg = server_command().config
        assert cfg is not None
        assert host_port(cfg.server.addr)[0] in ("[::]", "::")

    def test_engine_state_is_on_the_volume(self) -> None:
        cfg = server_command().config
        assert cfg is not None
        assert cfg.engine.state_dir.is_relative_to(server_app()["mounts"]["destination"])

    def test_stops_within_the_kill_timeout(self) -> None:
        cfg = server_command().config
        assert cfg is not None
        assert 2 * cfg.server.shutdown_grace < parse_duration(server_app()["kill_timeout"])

    def test_stores_in_s3_through_tigris(self) -> None:
        cfg = server_command().config
        assert cfg is not None
        assert cfg.server.storage.startswith("s3://")
        assert cfg.engine.s3_endpoint == "https://fly.storage.tigris.dev"

    def test_its_health_check_asks_an_open_route_on_the_port_it_serves(self) -> None:
        cfg = server_command().config
        assert cfg is not None
        [check] = server_app()["checks"].values()
        assert check["type"] == "http" and check["path"] == "/readyz" and "/readyz" in OPEN_PATHS  # no token needed
        assert check["port"] == int(host_port(cfg.server.addr)[1])

    def test_has_no_build_section_the_readme_gives_the_dockerfile(self) -> None:
        assert "build" not in server_app()
        assert "--dockerfile Dockerfile" in (FLY / "README.md").read_text()

