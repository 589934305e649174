"""Configuration: defaults < file < env < flags, every type, and every problem reported at once."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest

from sidecar import config, configdoc
from sidecar.config import (
    SECTIONS,
    Config,
    EngineConfig,
    SidecarConfig,
    add_flags,
    env_name,
    flags_from_args,
    load,
    parse_duration,
    parse_size,
    section_fields,
)
from sidecar.errors import ConfigError

ALL = list(SECTIONS)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return str(path)


def problems(**kwargs: Any) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(kwargs.pop("sections", ALL), **kwargs)
    return info.value.problems


def one_value(section: str, name: str, value: Any) -> Any:
    """The parsed value of one setting given in the environment."""
    cfg = load([section], env={env_name(section, name): value})
    return getattr(cfg.sections[section], name)


class TestPrecedence:
    def test_defaults_need_no_file_and_no_env(self) -> None:
        """Every section loads from defaults alone."""
        cfg = load(ALL, env={})
        assert cfg.sidecar == SidecarConfig()
        assert cfg.engine.l1_interval == 300.0
        assert cfg.server.max_body_size == 1 << 30
        assert cfg.log.level == "info"
        assert cfg.source("sidecar.batch_interval") == "default"

    def test_file_then_env_then_flags(self, tmp_path: Path) -> None:
        """Each later source overrides the earlier ones, and source() says which one won."""
        path = write(tmp_path, '[sidecar]\nbatch_interval = "2s"\ncluster = "a"\nretention = "1m"\n'
                               '[log]\nlevel = "debug"\n')
        env = {"LITEFS_SIDECAR_CLUSTER": "b", "LITEFS_SIDECAR_RETENTION": "2m"}
        cfg = load(["sidecar", "log"], config_file=path, env=env, flags={"sidecar.retention": "3m"})
        assert cfg.sidecar.batch_interval == 2.0
        assert cfg.sidecar.cluster == "b"
        assert cfg.sidecar.retention == 180.0
        assert cfg.log.level == "debug"
        assert cfg.source("sidecar.batch_interval") == f"file {path}"
        assert cfg.source("sidecar.cluster") == "env LITEFS_SIDECAR_CLUSTER"
        assert cfg.source("sidecar.retention") == "flag --retention"
        assert cfg.source("sidecar.upstream") == "default"

    def test_flag_none_means_not_given(self) -> None:
        """A None flag leaves the env value in place."""
        cfg = load(["sidecar"], env={"LITEFS_SIDECAR_CLUSTER": "b"}, flags={"sidecar.cluster": None})
        assert cfg.sidecar.cluster == "b"
        assert cfg.source("sidecar.cluster") == "env LITEFS_SIDECAR_CLUSTER"

    def test_typed_flag_values(self) -> None:
        """Flags may carry already-typed values."""
        cfg = load(["sidecar", "server"], env={}, flags={"sidecar.batch_interval": 0.25,
                                                         "sidecar.data_dir": Path("/d"),
                                                         "server.insecure_no_auth": True})
        assert cfg.sidecar.batch_interval == 0.25
        assert cfg.sidecar.data_dir == Path("/d")
        assert cfg.server.insecure_no_auth is True

    def test_only_requested_sections_are_loaded(self) -> None:
        """Other sections are absent, and their env vars are not errors."""
        cfg = load(["sidecar"], env={"LITEFS_SIDECAR_SERVER_ADDR": "nonsense"})
        with pytest.raises(AttributeError, match="'server' was not loaded"):
            _ = cfg.server
        with pytest.raises(KeyError):
            cfg.source("server.addr")

    def test_unknown_section_or_flag_is_a_programming_error(self) -> None:
        """Asking for a section or flag that does not exist is a bug, not a config problem."""
        with pytest.raises(ValueError, match="section"):
            load(["nope"], env={})
        with pytest.raises(ValueError, match=r"sidecar\.nope"):
            load(["sidecar"], env={}, flags={"sidecar.nope": 1})

    def test_config_can_be_built_directly(self) -> None:
        """Tests and callers can build a Config without load()."""
        cfg = Config(sections={"engine": EngineConfig(l0_interval=1.0)})
        assert cfg.engine.l0_interval == 1.0


class TestDurations:
    @pytest.mark.parametrize(("text", "seconds"), [
        ("500ms", 0.5), ("1s", 1.0), ("1.5s", 1.5), ("10m", 600.0), ("1h", 3600.0), ("30d", 2_592_000.0),
        ("1h30m", 5400.0), ("1m30s500ms", 90.5), ("2", 2.0), ("0.25", 0.25), (" 3s ", 3.0),
    ])
    def test_parses(self, text: str, seconds: float) -> None:
        """Units, combinations and plain seconds."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "fast", "1x", "s", "-1s", "1 s", "1.s", "1h 30m", "1e3", "1sm"])
    def test_rejects(self, text: str) -> None:
        """Anything else is not a duration."""
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)

    def test_toml_numbers_are_seconds(self, tmp_path: Path) -> None:
        """TOML ints and floats are seconds; booleans and negatives are refused."""
        cfg = load(["sidecar"], env={}, config_file=write(tmp_path, "[sidecar]\nbatch_interval = 0.1\n"
                                                                     "retention = 60\n"))
        assert (cfg.sidecar.batch_interval, cfg.sidecar.retention) == (0.1, 60.0)
        found = problems(sections=["sidecar"], config_file=write(
            tmp_path, "[sidecar]\nbatch_interval = true\nretention = -1\nrescan_interval = inf\n"))
        assert len(found) == 3
        assert all("not a duration" in p for p in found)

    def test_must_be_positive(self) -> None:
        """Intervals of zero are refused; retention and grace may be zero."""
        assert problems(sections=["sidecar"], env={"LITEFS_SIDECAR_BATCH_INTERVAL": "0s"}) == [
            'sidecar.batch_interval = "0s" (from env LITEFS_SIDECAR_BATCH_INTERVAL): must be greater than 0']
        assert one_value("sidecar", "shutdown_grace", "0") == 0.0


class TestSizes:
    @pytest.mark.parametrize(("text", "size"), [
        ("16MiB", 16 << 20), ("1GiB", 1 << 30), ("512KiB", 512 << 10), ("1000", 1000), ("10MB", 10_000_000),
        ("1.5KiB", 1536), ("2kb", 2000), ("7B", 7), ("1TiB", 1 << 40),
    ])
    def test_parses(self, text: str, size: int) -> None:
        """Binary and decimal units, and plain bytes."""
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["", "big", "1XB", "-1MiB", "MiB", "1e6"])
    def test_rejects(self, text: str) -> None:
        """Anything else is not a size."""
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)

    def test_rejects_fractional_bytes(self) -> None:
        """A size must come to a whole number of bytes."""
        with pytest.raises(ValueError, match="whole number of bytes"):
            parse_size("1.5B")

    def test_checks_bounds(self) -> None:
        """The multipart threshold cannot go below the S3 minimum part size."""
        assert one_value("engine", "multipart_threshold", "5MiB") == 5 << 20
        [problem] = problems(sections=["engine"], env={"LITEFS_SIDECAR_ENGINE_MULTIPART_THRESHOLD": "1MiB"})
        assert "must be at least 5MiB" in problem


class TestScalars:
    @pytest.mark.parametrize(("text", "value"), [
        ("true", True), ("yes", True), ("1", True), ("TRUE", True),
        ("false", False), ("no", False), ("0", False), ("No", False),
    ])
    def test_bools_from_env(self, text: str, value: bool) -> None:
        """true/false, yes/no and 1/0, in any case."""
        assert one_value("server", "insecure_no_auth", text) is value

    def test_bad_bool(self) -> None:
        """Other words are refused."""
        [problem] = problems(sections=["server"], env={"LITEFS_SIDECAR_SERVER_INSECURE_NO_AUTH": "maybe"})
        assert problem.endswith("not a boolean (true/false, yes/no, 1/0)")

    def test_ints(self, tmp_path: Path) -> None:
        """Whole numbers from env or file; floats, words and zero are refused."""
        assert one_value("sidecar", "max_files_per_upload", "12") == 12
        found = problems(sections=["sidecar"], config_file=write(tmp_path, "[sidecar]\nmax_files_per_upload = 1.5\n"))
        assert found == [f"sidecar.max_files_per_upload = 1.5 (from file {tmp_path}/sidecar.toml): not a whole number"]
        [problem] = problems(sections=["sidecar"], env={"LITEFS_SIDECAR_MAX_FILES_PER_UPLOAD": "0"})
        assert problem.endswith("must be at least 1")

    def test_paths(self) -> None:
        """Paths become Path; an empty required path is refused; an empty optional path is None."""
        assert one_value("sidecar", "data_dir", "/data") == Path("/data")
        assert one_value("server", "tokens_file", "/etc/t") == Path("/etc/t")
        assert one_value("server", "tokens_file", "") is None
        [problem] = problems(sections=["sidecar"], env={"LITEFS_SIDECAR_DATA_DIR": ""})
        assert problem == 'sidecar.data_dir = "" (from env LITEFS_SIDECAR_DATA_DIR): must not be empty'

    def test_strings_from_toml_must_be_strings(self, tmp_path: Path) -> None:
        """A TOML number where a string belongs is refused."""
        found = problems(sections=["sidecar"], config_file=write(tmp_path, "[sidecar]\ncluster = 7\n"))
        assert found[0].endswith("not a string")

    def test_choices(self) -> None:
        """Log level and format are one of a few words, in any case."""
        assert one_value("log", "level", "WARNING") == "warning"
        [problem] = problems(sections=["log"], env={"LITEFS_SIDECAR_LOG_FORMAT": "xml"})
        assert problem == ('log.format = "xml" (from env LITEFS_SIDECAR_LOG_FORMAT): '
                           "must be one of json, console, auto")

    @pytest.mark.parametrize(("name", "value"), [
        ("upstream", "https://backups.example.com"), ("upstream", "s3://bucket/prefix"),
        ("upstream", "file:///srv/backups"), ("litefs_url", "http://localhost:20202"),
        ("metrics_addr", "0.0.0.0:9091"), ("metrics_addr", ""), ("cluster", "prod-1"),
    ])
    def test_good_strings(self, name: str, value: str) -> None:
        """URLs with a known scheme, host:port addresses, and cluster names."""
        assert one_value("sidecar", name, value) == value

    @pytest.mark.parametrize(("name", "value", "why"), [
        ("upstream", "ftp://x", "scheme must be http, https, file or s3"),
        ("upstream", "s3://", "s3:// URL needs a bucket"),
        ("upstream", "file://", "file:// URL needs a path"),
        ("upstream", "s3://my_bucket!/litefs", "bucket name may hold only letters, digits, '.', '-' and '_' "
                                                "(s3://bucket/prefix)"),
        ("upstream", "s3://minio:9000/litefs", "bucket name may hold only letters, digits, '.', '-' and '_' "
                                               "(s3://bucket/prefix)"),
        ("upstream", "http://backups:99999", "port must be a number from 1 to 65535"),
        ("upstream", "https://backups:https", "port must be a number from 1 to 65535"),
        ("litefs_url", "http://127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("litefs_url", "localhost:20202", "scheme must be http or https"),
        ("metrics_addr", "9091", 'want host:port (or "" to disable)'),
        ("metrics_addr", "host:99999", 'want host:port (or "" to disable)'),
        ("cluster", "two words", "must be one word, not empty"),
        ("cluster", "../prod", "not a cluster name: contains a path separator"),
        ("cluster", ".litefs-sidecar", "not a cluster name: starts with a dot"),
    ])
    def test_bad_strings(self, name: str, value: str, why: str) -> None:
        """Each names what is wrong."""
        [problem] = problems(sections=["sidecar"], env={env_name("sidecar", name): value})
        assert problem.endswith(f": {why}")

    def test_server_addr_cannot_be_disabled(self) -> None:
        """The server must listen somewhere."""
        [problem] = problems(sections=["server"], env={"LITEFS_SIDECAR_SERVER_ADDR": ""})
        assert problem.endswith(": want host:port")


class TestEngineLevels:
    def test_levels_must_get_coarser(self) -> None:
        """l0 < l1 < l2 < snapshot, naming both values and their sources."""
        [problem] = problems(sections=["engine"], env={"LITEFS_SIDECAR_ENGINE_L1_INTERVAL": "5s"})
        assert problem == ('engine.l1_interval = "5s" (from env LITEFS_SIDECAR_ENGINE_L1_INTERVAL): '
                           'must be longer than engine.l0_interval = "10s" (from default)')

    def test_retention_must_cover_its_interval(self) -> None:
        """A level is kept at least as long as it takes to write the next one."""
        [problem] = problems(sections=["engine"], flags={"engine.l2_retention": "30m"})
        assert problem == ('engine.l2_retention = "30m" (from flag --l2-retention): '
                           'must be at least engine.l2_interval = "1h" (from default)')

    def test_lease_ttl_must_exceed_three_times_the_skew(self) -> None:
        """The lease's own rule, checked here so that `run` and `serve` exit 2 instead of raising at start."""
        [problem] = problems(sections=["engine"], flags={"engine.lease_ttl": "5s"})
        assert problem == ('engine.lease_ttl = "5s" (from flag --lease-ttl): '
                           'must be more than 3 times engine.lease_skew = "2s" (from default)')
        assert load(["engine"], env={}, flags={"engine.lease_ttl": "1s", "engine.lease_skew": "0"})

    def test_consistent_levels_load(self) -> None:
        """Short intervals for tests are fine as long as they are ordered."""
        env = {"LITEFS_SIDECAR_ENGINE_" + k: v for k, v in {
            "L0_INTERVAL": "100ms", "L1_INTERVAL": "1s", "L2_INTERVAL": "2s", "SNAPSHOT_INTERVAL": "3s",
            "L0_RETENTION": "1s"}.items()}
        cfg = load(["engine"], env=env)
        assert math.isclose(cfg.engine.l0_interval, 0.1)


class TestProblems:
    def test_all_problems_at_once(self, tmp_path: Path) -> None:
        """Three bad values from three sources make one ConfigError with three problems."""
        path = write(tmp_path, '[sidecar]\nretention = "soon"\n')
        found = problems(sections=["sidecar"], config_file=path,
                         env={"LITEFS_SIDECAR_BATCH_INTERVAL": "fast"},
                         flags={"sidecar.upstream": "ftp://x"})
        assert sorted(found) == sorted([
            'sidecar.batch_interval = "fast" (from env LITEFS_SIDECAR_BATCH_INTERVAL): '
            "not a duration (examples: 500ms, 1s, 10m)",
            f'sidecar.retention = "soon" (from file {path}): not a duration (examples: 500ms, 1s, 10m)',
            'sidecar.upstream = "ftp://x" (from flag --upstream): scheme must be http, https, file or s3',
        ])

    def test_message_lists_every_problem(self) -> None:
        """str(ConfigError) shows each problem on its own line."""
        with pytest.raises(ConfigError) as info:
            load(["log"], env={"LITEFS_SIDECAR_LOG_LEVEL": "loud", "LITEFS_SIDECAR_LOG_FORMAT": "xml"})
        assert str(info.value).count("\n") == 2

    def test_only_the_winning_value_is_checked(self) -> None:
        """A bad env value overridden by a good flag is not a problem."""
        cfg = load(["sidecar"], env={"LITEFS_SIDECAR_BATCH_INTERVAL": "fast"}, flags={"sidecar.batch_interval": "2s"})
        assert cfg.sidecar.batch_interval == 2.0


class TestUnknown:
    def test_unknown_toml_key_and_table(self, tmp_path: Path) -> None:
        """Typos in the file are errors, with a suggestion when one is close."""
        path = write(tmp_path, '[engine]\nl0_intervl = "1s"\n[sidecr]\nx = 1\n[sidecar]\nbogus = 1\n')
        assert problems(sections=["sidecar"], config_file=path) == [
            f"engine.l0_intervl (from file {path}): unknown key; did you mean l0_interval?",
            f"sidecr (from file {path}): unknown table; did you mean sidecar?",
            f"sidecar.bogus (from file {path}): unknown key",
        ]

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """Settings belong in a table."""
        path = write(tmp_path, 'batch_interval = "1s"\n')
        assert problems(sections=["sidecar"], config_file=path) == [f"batch_interval (from file {path}): unknown key"]

    def test_unknown_env_var(self) -> None:
        """Only our prefix is checked; other variables are none of our business."""
        found = problems(sections=["sidecar"], env={"LITEFS_SIDECAR_BATCH_INTERVL": "1s", "HOME": "/root",
                                                    "LITEFS_CLOUD_TOKEN": "x"})
        assert found == ["LITEFS_SIDECAR_BATCH_INTERVL (from env): unknown variable; "
                         "did you mean LITEFS_SIDECAR_BATCH_INTERVAL?"]

    def test_other_sections_tables_are_allowed(self, tmp_path: Path) -> None:
        """One file can hold every command's tables; unrequested ones are not parsed."""
        path = write(tmp_path, '[server]\naddr = "not an addr"\n[sidecar]\ncluster = "x"\n')
        assert load(["sidecar"], env={}, config_file=path).sidecar.cluster == "x"


class TestSecrets:
    def test_secrets_come_from_env(self) -> None:
        """Tokens are read from the environment and hidden from repr."""
        cfg = load(["sidecar", "server"], env={"LITEFS_SIDECAR_TOKEN": "s3cret",
                                               "LITEFS_SIDECAR_SERVER_ADMIN_TOKEN": "adm1n",
                                               "LITEFS_SIDECAR_SERVER_TOKENS": "prod a;staging b"})
        assert cfg.sidecar.token == "s3cret"
        assert cfg.server.admin_token == "adm1n"
        assert cfg.server.tokens == "prod a;staging b"
        assert "s3cret" not in repr(cfg.sidecar)
        assert "adm1n" not in repr(cfg.server)

    def test_secrets_in_file_are_refused(self, tmp_path: Path) -> None:
        """Even in a table the command does not load, and without echoing the secret."""
        path = write(tmp_path, '[server]\nadmin_token = "adm1n"\n[sidecar]\ntoken = "s3cret"\n')
        found = problems(sections=["sidecar"], config_file=path)
        assert found == [
            f"server.admin_token (from file {path}): secrets are read only from the environment "
            "(LITEFS_SIDECAR_SERVER_ADMIN_TOKEN)",
            f"sidecar.token (from file {path}): secrets are read only from the environment (LITEFS_SIDECAR_TOKEN)",
        ]

    def test_secrets_have_no_flags(self) -> None:
        """add_flags skips secrets."""
        parser = argparse.ArgumentParser()
        add_flags(parser, "server")
        options = {o for action in parser._actions for o in action.option_strings}
        assert "--addr" in options
        assert not options & {"--tokens", "--admin-token"}


class TestConfigFile:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing --config file is a problem, reported with the others."""
        found = problems(sections=["log"], config_file=str(tmp_path / "nope.toml"),
                         env={"LITEFS_SIDECAR_LOG_LEVEL": "loud"})
        assert found[0] == f"config file {tmp_path / 'nope.toml'}: not found"
        assert len(found) == 2

    def test_unparsable_file_names_the_line(self, tmp_path: Path) -> None:
        """TOML syntax errors carry the file and the line."""
        path = write(tmp_path, '[sidecar]\ncluster = "x"\nbatch_interval =\n')
        [problem] = problems(sections=["sidecar"], config_file=path)
        assert problem.startswith(f"config file {path}: not valid TOML:")
        assert "line 3" in problem

    def test_directory_is_not_a_file(self, tmp_path: Path) -> None:
        """Other I/O errors are reported too."""
        [problem] = problems(sections=["sidecar"], config_file=str(tmp_path))
        assert problem.startswith(f"config file {tmp_path}: ")

    def test_file_not_in_utf8_is_a_problem_not_a_crash(self, tmp_path: Path) -> None:
        """TOML is UTF-8: a file saved in Latin-1 is reported with its position, like a syntax error."""
        path = tmp_path / "sidecar.toml"
        path.write_bytes('[sidecar]\ncluster = "caf\u00e9"\n'.encode("latin-1"))
        [problem] = problems(sections=["sidecar"], config_file=str(path))
        assert problem.startswith(f"config file {path}: not UTF-8")


class TestFlags:
    def parse(self, argv: list[str], section: str, fields: list[str] | None = None) -> dict[str, Any]:
        parser = argparse.ArgumentParser()
        add_flags(parser, section, fields)
        return flags_from_args(parser.parse_args(argv), section)

    def test_not_given_flags_are_absent(self) -> None:
        """Defaults are None, so only given flags reach load()."""
        assert self.parse([], "sidecar") == {}

    def test_round_trip_through_load(self) -> None:
        """Flags parse as strings and load() types them, naming the flag as the source."""
        flags = self.parse(["--batch-interval", "250ms", "--data-dir", "/d"], "sidecar")
        assert flags == {"sidecar.batch_interval": "250ms", "sidecar.data_dir": "/d"}
        cfg = load(["sidecar"], env={}, flags=flags)
        assert cfg.sidecar.batch_interval == 0.25
        assert cfg.source("sidecar.data_dir") == "flag --data-dir"

    def test_bool_and_choice_flags(self) -> None:
        """Booleans get --x/--no-x; choices are checked by argparse."""
        assert self.parse(["--no-s3-force-path-style"], "engine") == {"engine.s3_force_path_style": False}
        assert self.parse(["--log-level", "debug"], "log") == {"log.level": "debug"}
        with pytest.raises(SystemExit):
            self.parse(["--log-level", "loud"], "log")

    def test_subset_of_fields(self) -> None:
        """Only the named fields get flags, so two sections can share a parser."""
        parser = argparse.ArgumentParser()
        add_flags(parser, "sidecar")
        add_flags(parser, "engine", ["l0_interval"])
        args = parser.parse_args(["--state-dir", "/s", "--l0-interval", "1s"])
        assert flags_from_args(args, "sidecar") == {"sidecar.state_dir": "/s"}
        assert flags_from_args(args, "engine") == {"engine.l0_interval": "1s"}
        with pytest.raises(ValueError, match=r"engine\.nope"):
            add_flags(parser, "engine", ["nope"])

    def test_help_names_default_and_env(self) -> None:
        """Help text comes from the metadata."""
        parser = argparse.ArgumentParser()
        add_flags(parser, "sidecar")
        text = parser.format_help()
        assert "--batch-interval DURATION" in text
        assert "LITEFS_SIDECAR_BATCH_INTERVAL" in text


class TestSchema:
    def test_env_names_are_unique(self) -> None:
        """The sidecar section's short names never shadow another section's variables."""
        names = [env_name(s, f.name) for s in SECTIONS for f in section_fields(s)]
        assert len(names) == len(set(names))

    def test_env_name_rule(self) -> None:
        """LITEFS_SIDECAR_<FIELD> for sidecar, LITEFS_SIDECAR_<SECTION>_<FIELD> for the others."""
        assert env_name("sidecar", "batch_interval") == "LITEFS_SIDECAR_BATCH_INTERVAL"
        assert env_name("engine", "l0_interval") == "LITEFS_SIDECAR_ENGINE_L0_INTERVAL"
        assert env_name("log", "level") == "LITEFS_SIDECAR_LOG_LEVEL"

    @pytest.mark.parametrize("section", ALL)
    def test_every_field_is_documented(self, section: str) -> None:
        """Each setting has help text and says whether it is a secret."""
        for f in section_fields(section):
            assert f.metadata["help"], f.name
            assert isinstance(f.metadata["secret"], bool)

    def test_defaults_pass_their_own_checks(self) -> None:
        """Loading with every default given explicitly changes nothing."""
        env = {env_name(s, f.name): str(f.metadata["default_text"]).lower() if isinstance(
            f.metadata["default_text"], bool) else str(f.metadata["default_text"])
            for s in ALL for f in section_fields(s)}
        env["LITEFS_SIDECAR_ENGINE_L0_INTERVAL"] = "1s"  # the default beside the sidecar's file:// upstream
        assert load(ALL, env=env).sections == load(ALL, env={}).sections

    def test_run_on_a_file_upstream_makes_every_second_a_restore_point(self) -> None:
        """l0_interval defaults to 1 s with the sidecar's file:// upstream; 10 s on S3, in `serve`, or when given."""
        cfg = load(["sidecar", "engine"], env={})  # the default upstream is file://
        assert cfg.engine.l0_interval == 1 and cfg.source("engine.l0_interval") == "default for a file:// upstream"
        cfg = load(["sidecar", "engine"], env={}, flags={"sidecar.upstream": "s3://bucket/litefs"})
        assert cfg.engine.l0_interval == 10 and cfg.source("engine.l0_interval") == "default"
        assert load(["server", "engine"], env={}).engine.l0_interval == 10
        cfg = load(["sidecar", "engine"], env={"LITEFS_SIDECAR_ENGINE_L0_INTERVAL": "2s"})
        assert cfg.engine.l0_interval == 2
        # The checks see the effective default: an l1_interval under 10 s is fine when l0 is 1 s.
        assert load(["sidecar", "engine"], env={}, flags={"engine.l1_interval": "5s"}).engine.l1_interval == 5

    def test_runs_engine_state_is_under_its_own_unless_given(self) -> None:
        """`run`'s in-process engine: `<sidecar.state_dir>/engine` by default, `engine.state_dir` when given."""
        cfg = load(["sidecar", "engine"], env={"LITEFS_SIDECAR_STATE_DIR": "/srv/sidecar"})
        assert cfg.engine.state_dir == Path("/srv/sidecar/engine")
        cfg = load(["sidecar", "engine"], env={"LITEFS_SIDECAR_STATE_DIR": "/srv/sidecar"},
                   flags={"engine.state_dir": "/fast/engine"})
        assert cfg.engine.state_dir == Path("/fast/engine") and cfg.source("engine.state_dir") == "flag --state-dir"
        assert load(["server", "engine"], env={}).engine.state_dir == Path("/var/lib/litefs-sidecar/engine")

    def test_os_environ_is_the_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without env=, load() reads the process environment."""
        monkeypatch.setenv("LITEFS_SIDECAR_LOG_LEVEL", "error")
        assert config.load(["log"]).log.level == "error"


class TestDocs:
    def test_docs_match_the_code(self) -> None:
        """docs/configuration.md is what `python -m sidecar.configdoc` generates."""
        hint = "run: python -m sidecar.configdoc > docs/configuration.md"
        assert configdoc.DOC.read_text() == configdoc.render(), hint

    def test_check_flag(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--check exits 1 on drift and 0 when current."""
        stale = tmp_path / "configuration.md"
        stale.write_text("old\n")
        assert configdoc.main(["--check", str(stale)]) == 1
        assert "out of date" in capsys.readouterr().err
        stale.write_text(configdoc.render())
        assert configdoc.main(["--check", str(stale)]) == 0

    def test_every_env_var_is_documented(self) -> None:
        """Each variable appears in the reference, secrets marked env only."""
        text = configdoc.render()
        for s in ALL:
            for f in section_fields(s):
                assert f"`{env_name(s, f.name)}`" in text
        assert "`LITEFS_SIDECAR_SERVER_ADMIN_TOKEN` (env only)" in text
