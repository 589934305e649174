"""Configuration: one frozen dataclass per section, built once by `load()`; the only reader of os.environ.

Every setting has a default, a TOML key (`[section] field`), an environment variable and, unless it is a
secret, a flag. Later sources win: defaults < the `--config` file < the environment < flags. Variables are
`LITEFS_SIDECAR_<FIELD>` for the `sidecar` section and `LITEFS_SIDECAR_<SECTION>_<FIELD>` for the others.

`load()` reports every problem at once, each as `field = value (from source): why`, and remembers where each
value came from (`cfg.source("sidecar.batch_interval")`). `docs/configuration.md` is generated from the field
metadata below by `python -m sidecar.configdoc`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sidecar.errors import ConfigError, InvalidDatabaseName, validate_cluster_name

ENV_PREFIX = "LITEFS_SIDECAR_"

_Check = Callable[[Any], str | None]

# --- value types: each parser takes text and returns the value or raises ValueError(why) ---

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_NOT_DURATION = "not a duration (examples: 500ms, 1s, 10m)"
_NOT_SIZE = "not a size (examples: 512KiB, 16MiB, 1GiB, 10MB, 1000)"


def parse_duration(text: str) -> float:
    """Seconds in `text`: "500ms", "1.5s", "10m", "1h30m", "30d", or a plain number of seconds."""
    s = text.strip()
    if _NUMBER.fullmatch(s):
        return float(s)
    parts = list(_DURATION_PART.finditer(s))
    if not parts or "".join(p.group(0) for p in parts) != s:
        raise ValueError(_NOT_DURATION)
    return sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)


def parse_size(text: str) -> int:
    """Bytes in `text`: "512KiB", "16MiB", "1GiB" (binary), "10MB" (decimal), or a plain number of bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(_NOT_SIZE)
    n = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if n != int(n):
        raise ValueError("not a whole number of bytes")
    return int(n)


def _to_duration(value: Any) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(_NOT_DURATION)


def _to_size(value: Any) -> int:
    if isinstance(value, str):
        return parse_size(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(_NOT_SIZE)


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError("not a whole number")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise ValueError("not a boolean (true/false, yes/no, 1/0)")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("not a string")


def _to_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not _to_str(value):
        raise ValueError("must not be empty")
    return Path(value)


def _to_optional_path(value: Any) -> Path | None:
    return None if value == "" else _to_path(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "duration": _to_duration, "size": _to_size, "int": _to_int, "bool": _to_bool, "str": _to_str,
    "path": _to_path, "optional path": _to_optional_path, "choice": lambda v: _to_str(v).lower(),
}

# --- checks on parsed values: None if fine, else why not ---


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(low: int, text: str) -> _Check:
    return lambda value: None if value >= low else f"must be at least {text}"


def _one_of(choices: Sequence[str]) -> _Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _word(value: str) -> str | None:
    return None if value and not any(c.isspace() for c in value) else "must be one word, not empty"


def _cluster_name(value: str) -> str | None:
    """One word that is also a safe name in the store (no `/`, no leading dot): the server's rule for clusters."""
    if why := _word(value):
        return why
    try:
        validate_cluster_name(value)
    except InvalidDatabaseName as err:
        return f"not a cluster name: {err.why}"
    return None


_BUCKET = re.compile(r"[a-zA-Z0-9._-]{1,255}")  # what botocore sends; S3 itself is stricter, S3-compatibles vary


def _url_check(schemes: Sequence[str], empty: bool) -> _Check:
    def check(value: str) -> str | None:
        url = urlsplit(value)
        if empty and not value:
            return None
        if url.scheme not in schemes:
            return f"scheme must be {', '.join(schemes[:-1])} or {schemes[-1]}"
        if url.scheme == "file" and not url.path:
            return "file:// URL needs a path"
        if url.scheme != "file" and not url.netloc:
            return f"{url.scheme}:// URL needs a {'bucket' if url.scheme == 's3' else 'host'}"
        if url.scheme == "s3" and not _BUCKET.fullmatch(url.netloc):
            return "bucket name may hold only letters, digits, '.', '-' and '_' (s3://bucket/prefix)"
        if url.scheme in ("http", "https"):
            try:
                port = url.port  # None when absent; ValueError if not a number or above 65535
            except ValueError:
                port = 0
            if port == 0:
                return "port must be a number from 1 to 65535"
        return None
    return check


def _addr_check(empty: bool) -> _Check:
    def check(value: str) -> str | None:
        host, _, port = value.rpartition(":")
        if (empty and not value) or (host and port.isdigit() and int(port) <= 65535):
            return None
        return "want host:port" + (' (or "" to disable)' if empty else "")
    return check


# --- settings: dataclass fields whose metadata carries help, type and checks ---


def _setting(kind: str, default: Any, help: str, *, secret: bool = False, example: Any = None,
             check: _Check | None = None, choices: Sequence[str] = (), label: str = "") -> Any:
    """A field whose `default` is written as a user would write it ("10s", "16MiB") and parsed here."""
    meta = {"help": help, "secret": secret, "example": example, "kind": kind, "default_text": default,
            "check": check, "choices": tuple(choices), "type": label or kind}
    return field(default=_PARSERS[kind](default), repr=not secret, metadata=meta)


def _duration(default: str, help: str, *, check: _Check | None = _positive, example: Any = None) -> Any:
    return _setting("duration", default, help, check=check, example=example)


def _url(default: str, help: str, *schemes: str, empty: bool = False, example: Any = None) -> Any:
    return _setting("str", default, help, check=_url_check(schemes, empty), label="URL", example=example)


def _addr(default: str, help: str, *, empty: bool = False, example: Any = None) -> Any:
    return _setting("str", default, help, check=_addr_check(empty), label="host:port", example=example)


def _choice(default: str, help: str, choices: Sequence[str], *, example: Any = None) -> Any:
    return _setting("choice", default, help, check=_one_of(choices), choices=choices, example=example)


def _secret(help: str, example: str) -> Any:
    return _setting("str", "", help, secret=True, example=example)


# _setting() returns a dataclasses.Field; RUF009 can't see that through a Path annotation, hence the noqas.


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """`litefs-sidecar run`: the daemon beside each LiteFS node that ships its LTX files upstream."""

    data_dir: Path = _setting("path", "/var/lib/litefs", "LiteFS data directory, holding `dbs/<db>/ltx/`")  # noqa: RUF009
    mount_dir: Path = _setting("path", "/litefs", "LiteFS FUSE mount, holding `<db>-pos` and `.primary`")  # noqa: RUF009
    litefs_url: str = _url("http://127.0.0.1:20202", "LiteFS HTTP API", "http", "https")
    litefs_config: Path | None = _setting("optional path", "", "LiteFS's `litefs.yml`, checked at start for "  # noqa: RUF009
                                          "`data.retention` > 0 or a `backup:` section; empty: where LiteFS looks",
                                          example="/etc/litefs.yml")
    upstream: str = _url("file:///var/lib/litefs-sidecar/backups", "where backups go: a backup server, or an "
                         "engine in-process over `file://` or `s3://` storage", "http", "https", "file", "s3",
                         example="https://backups.internal:20203")
    cluster: str = _setting("str", "default", "cluster name; each cluster is its own backup namespace",
                            check=_cluster_name, example="prod")
    token: str = _secret("auth token for an `http(s)://` upstream", "$(cat /run/secrets/backup-token)")
    batch_interval: float = _duration("1s", "how long to gather LTX files into one upload (sub-second allowed)")
    max_files_per_upload: int = _setting("int", 4096, "most LTX files in one upload", check=_at_least(1, "1"))
    retention: float = _duration("10m", "keep local LTX files at least this long", check=None)
    rescan_interval: float = _duration("5m", "how often `data_dir` is rescanned for files the watcher missed")
    position_interval: float = _duration("10s", "how often upstream's position is re-read (notices operator restores "
                                         "on an idle node, as LiteFS's 10 s full sync does)")
    metrics_addr: str = _addr("127.0.0.1:9091", 'where to serve `/metrics`; "" disables', empty=True,
                              example="0.0.0.0:9091")
    shutdown_grace: float = _duration("10s", "on stop, how long to ship what is batched, and then how long the "
                                      "in-process engine's final flush may take; keep twice it below the "
                                      "platform's kill timeout", check=None)
    backoff_max: float = _duration("30s", "longest wait between retries of a failed upload")
    state_dir: Path = _setting("path", "/var/lib/litefs-sidecar", "the sidecar's own state")  # noqa: RUF009


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The backup engine: compaction levels and retention, in `serve` and for `file://`/`s3://` upstreams."""

    l0_interval: float = _duration("10s", "how often uploads are flushed to one L0 file; 0 flushes each upload "
                                   "(every upload is then a restore point). `run` with a `file://` upstream "
                                   "defaults to 1s: a local write costs about 0.4 ms", check=None)
    l1_interval: float = _duration("5m", "how often L0 files are compacted into L1")
    l2_interval: float = _duration("1h", "how often L1 files are compacted into L2")
    snapshot_interval: float = _duration("24h", "how often a full snapshot is written")
    l0_retention: float = _duration("24h", "how long L0 files are kept (at least `l0_interval`)")
    l1_retention: float = _duration("30d", "how long L1 files are kept (at least `l1_interval`)")
    l2_retention: float = _duration("30d", "how long L2 files are kept (at least `l2_interval`)")
    snapshot_retention: float = _duration("30d", "how long snapshots are kept: the oldest restore point",
                                          example="90d")
    state_dir: Path = _setting("path", "/var/lib/litefs-sidecar/engine",  # noqa: RUF009
                               "pending uploads and the index cache (`run`: `<sidecar.state_dir>/engine` unless given)")
    s3_endpoint: str = _url("", "S3-compatible endpoint; empty means AWS", "http", "https", empty=True,
                            example="https://fly.storage.tigris.dev")
    s3_region: str = _setting("str", "", "S3 region; empty means the AWS default chain", example="auto")
    s3_force_path_style: bool = _setting("bool", False, "address buckets as `endpoint/bucket` (MinIO and others)")
    multipart_threshold: int = _setting("size", "16MiB", "files at least this large are uploaded in parts",
                                        check=_at_least(5 << 20, "5MiB, the S3 minimum part size"))
    lease_ttl: float = _duration("12s", "how long a cluster's lease lasts unrenewed: one writer per cluster; it is "
                                 "renewed every third of this while busy, and a dead owner is replaced after this plus "
                                 "`lease_skew`", check=None)
    lease_skew: float = _duration("2s", "clock difference between hosts the leases tolerate", check=None)
    max_clock_skew: float = _duration("1h", "how far past this host's clock an upload's timestamp may be",
                                      check=None)
    commit_delay: float = _duration("3ms", "how long the upload log gathers uploads before the fdatasync that "
                                    "acknowledges them: under load, fewer syncs and less CPU per upload, for at most "
                                    "this much latency (0: sync at once)", check=None)
    verify_checksums: bool = _setting("bool", True, "check each upload's claimed post-apply checksum against the "
                                      "database's page checksums before accepting it")
    max_pending_bytes: int = _setting("size", "1GiB", "acknowledged upload bytes not yet in the store beyond which "
                                      "uploads get 503 with Retry-After (0: no ceiling)", check=_at_least(0, "0"))
    max_databases: int = _setting("int", 10000, "most databases one cluster may hold; an upload creating one more "
                                  "is refused (403 `ETOOMANYDBS`) before its body is read (0: no ceiling)",
                                  check=_at_least(0, "0"))
    max_hwm_lag: float = _duration("60s", "how far behind a database's HWM may fall (its oldest upload not yet in "
                                   "the store) before its uploads get 503 with Retry-After (0: no ceiling)",
                                   check=None)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """`litefs-sidecar serve`: the backup server speaking the LiteFS Cloud protocol."""

    addr: str = _addr("127.0.0.1:20203", "where to listen", example="0.0.0.0:20203")
    storage: str = _url("file:///var/lib/litefs-sidecar/backups", "where backups are stored", "file", "s3",
                        example="s3://my-bucket/litefs")
    tokens_file: Path | None = _setting("optional path", "", "cluster tokens, one `<cluster> <token>` per line; "  # noqa: RUF009
                                        "`#` comments", example="/etc/litefs-sidecar/tokens")
    tokens: str = _secret("cluster tokens as in `tokens_file`, entries separated by `;` or newlines",
                          "prod 6f1e…;staging 93ab…")
    admin_token: str = _secret("token for the operator API", "$(openssl rand -hex 24)")
    insecure_no_auth: bool = _setting("bool", False, "accept any caller (local testing only)")
    max_body_size: int = _setting("size", "1GiB", "largest accepted upload, and most bytes of uploads one cluster "
                                   "may have in flight at once (one more gets 503 `EBUSY`)",
                                   check=_at_least(1, "1 byte"))
    request_timeout: float = _duration("300s", "longest an upload's body may take to arrive, and a download's client "
                                       "to take each chunk (1 MiB) of it")
    header_timeout: float = _duration("20s", "a new connection that has not sent its request headers by then is "
                                      "closed")
    idle_timeout: float = _duration("75s", "an idle keep-alive connection is closed after this")
    max_connections: int = _setting("int", 10000, "connections held at once; one more is closed at once",
                                    check=_at_least(1, "1"))
    shutdown_grace: float = _duration("30s", "on stop, how long in-flight uploads may finish, and then how long "
                                      "the final flush to the store may take", check=None)
    workers: int = _setting("int", 1, "processes serving `addr` together (SO_REUSEPORT), each with its own engine "
                            "and `<state_dir>/worker-<n>`; a connection whose first request is for a cluster another "
                            "process writes is handed to that process whole", check=_at_least(1, "1"))
    worker: int = _setting("int", 0, "this process's number among `workers` (set by `serve --workers` for each "
                           "process it starts; 0 for a process on its own)", check=_at_least(0, "0"))
    advertise_url: str = _url("", "where other server processes reach this one (written in its leases, for "
                              "forwarding); default `http://<addr>`, or a private loopback port for workers",
                              "http", "https", empty=True, example="http://10.0.0.5:20203")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging, for every command."""

    level: str = _choice("info", "least severe level written (`debug` adds a line per upload and per `GET /pos`)",
                         ("debug", "info", "warning", "error"))
    format: str = _choice("auto", "`json` (one object per line), `console`, or `auto`: console at a TTY, JSON "
                          "otherwise", ("json", "console", "auto"), example="json")


SECTIONS: dict[str, type] = {"sidecar": SidecarConfig, "engine": EngineConfig, "server": ServeConfig,
                             "log": LogConfig}


def env_name(section: str, name: str) -> str:
    """The environment variable of one setting: LITEFS_SIDECAR_[<SECTION>_]<FIELD>."""
    return (ENV_PREFIX + ("" if section == "sidecar" else f"{section}_") + name).upper()


def flag_name(name: str, section: str = "") -> str:
    """The command-line flag of one setting: `batch_interval` → `--batch-interval`; `[log] level` → `--log-level`."""
    return "--" + (f"{section}-" if section in _PREFIXED else "") + name.replace("_", "-")


_PREFIXED = {"log"}  # sections whose short field names would be ambiguous as flags


def section_fields(section: str) -> tuple[dataclasses.Field[Any], ...]:
    """The settings of one section, in declaration order."""
    return dataclasses.fields(SECTIONS[section])


# Every variable names one setting; the sidecar section's short names must not shadow another section's (tested).
_ENV = {env_name(s, f.name): (s, f.name) for s in SECTIONS for f in section_fields(s)}
_DEFAULT_TEXT = {f"{s}.{f.name}": f.metadata["default_text"] for s in SECTIONS for f in section_fields(s)}


# --- the loaded configuration ---

_S = TypeVar("_S")


@dataclass(frozen=True)
class Config:
    """The requested sections, and where each value came from ("default", "file PATH", "env NAME", "flag --x")."""

    sections: Mapping[str, object] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def sidecar(self) -> SidecarConfig:
        return self._section("sidecar", SidecarConfig)

    @property
    def engine(self) -> EngineConfig:
        return self._section("engine", EngineConfig)

    @property
    def server(self) -> ServeConfig:
        return self._section("server", ServeConfig)

    @property
    def log(self) -> LogConfig:
        return self._section("log", LogConfig)

    def source(self, key: str) -> str:
        """Where the value of `key` ("section.field") came from."""
        try:
            return self.sources[key]
        except KeyError:
            raise KeyError(f"{key}: not a loaded setting") from None

    def _section(self, name: str, cls: type[_S]) -> _S:
        value = self.sections.get(name)
        if not isinstance(value, cls):
            raise AttributeError(f"configuration section {name!r} was not loaded")
        return value


@dataclass(frozen=True, slots=True)
class _Given:
    value: Any
    source: str


def _show(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value) if isinstance(value, str | bool | int | float) else repr(value)


def _unknown(what: str, name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown {what}" + (f"; did you mean {close[0]}?" if close else "")


def _from_file(path: str, wanted: Sequence[str], given: dict[str, _Given], problems: list[str]) -> None:
    source, doc = f"file {path}", {}
    try:
        with open(path, "rb") as fp:
            doc = tomllib.load(fp)
    except FileNotFoundError:
        problems.append(f"config file {path}: not found")
    except tomllib.TOMLDecodeError as err:  # the message ends "(at line L, column C)"
        problems.append(f"config file {path}: not valid TOML: {err}")
    except UnicodeDecodeError as err:  # TOML is UTF-8; tomllib decodes the whole file before parsing
        line = err.object.count(b"\n", 0, err.start) + 1
        problems.append(f"config file {path}: not UTF-8: byte 0x{err.object[err.start]:02x} on line {line}")
    except OSError as err:
        problems.append(f"config file {path}: {err.strerror or err}")
    for table, entries in doc.items():
        if table not in SECTIONS or not isinstance(entries, dict):
            what = "table" if isinstance(entries, dict) else "key"
            problems.append(f"{table} (from {source}): {_unknown(what, table, list(SECTIONS))}")
            continue
        known = {f.name: f for f in section_fields(table)}
        for name, value in entries.items():
            key = f"{table}.{name}"
            if name not in known:
                problems.append(f"{key} (from {source}): {_unknown('key', name, list(known))}")
            elif known[name].metadata["secret"]:
                problems.append(f"{key} (from {source}): secrets are read only from the environment "
                                f"({env_name(table, name)})")
            elif table in wanted:  # other commands' tables may share the file; they are checked by key only
                given[key] = _Given(value, source)


def _from_env(env: Mapping[str, str], wanted: Sequence[str], given: dict[str, _Given], problems: list[str]) -> None:
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in _ENV:
            problems.append(f"{name} (from env): {_unknown('variable', name, list(_ENV))}")
        elif _ENV[name][0] in wanted:
            given[".".join(_ENV[name])] = _Given(value, f"env {name}")


def _from_flags(flags: Mapping[str, Any], wanted: Sequence[str], given: dict[str, _Given]) -> None:
    for key, value in flags.items():
        section, _, name = key.partition(".")
        if section not in wanted or name not in {f.name for f in section_fields(section)}:
            raise ValueError(f"flag for {key!r}: not a setting of the loaded sections {list(wanted)}")
        if value is not None:
            given[key] = _Given(value, f"flag {flag_name(name, section)}")


def _check_engine(cfg: EngineConfig, given: Mapping[str, _Given], problems: list[str]) -> None:
    """Levels get coarser (l0 < l1 < l2 < snapshot), each level is kept at least as long as its interval, and a
    lease outlasts three times the clock skew it allows for."""

    def where(name: str) -> str:
        key = f"engine.{name}"
        g = given.get(key) or _Given(_DEFAULT_TEXT[key], "default")
        return f"{key} = {_show(g.value)} (from {g.source})"

    levels = ["l0", "l1", "l2", "snapshot"]
    for lower, upper in itertools.pairwise(levels):
        if getattr(cfg, f"{upper}_interval") <= getattr(cfg, f"{lower}_interval"):
            problems.append(f"{where(f'{upper}_interval')}: must be longer than {where(f'{lower}_interval')}")
    for level in levels:
        if getattr(cfg, f"{level}_retention") < getattr(cfg, f"{level}_interval"):
            problems.append(f"{where(f'{level}_retention')}: must be at least {where(f'{level}_interval')}")
    if cfg.lease_ttl <= 3 * cfg.lease_skew:  # sidecar.engine.lease.Leases refuses it
        problems.append(f"{where('lease_ttl')}: must be more than 3 times {where('lease_skew')}")


def _build(section: str, given: Mapping[str, _Given], sources: dict[str, str], problems: list[str]) -> Any:
    values: dict[str, Any] = {}
    before = len(problems)
    for f in section_fields(section):
        key = f"{section}.{f.name}"
        g = given.get(key)
        sources[key] = g.source if g else "default"
        if g is None:
            continue
        meta = f.metadata
        try:
            values[f.name] = value = _PARSERS[meta["kind"]](g.value)
            why = meta["check"](value) if meta["check"] else None
        except ValueError as err:
            why = str(err)
        if why:
            shown = "<secret>" if meta["secret"] else _show(g.value)
            problems.append(f"{key} = {shown} (from {g.source}): {why}")
    if len(problems) > before:
        return None
    cfg = SECTIONS[section](**values)
    if section == "engine":
        _check_engine(cfg, given, problems)
    return cfg


def _contextual_defaults(sections: Sequence[str], given: dict[str, _Given]) -> None:
    """Defaults that depend on another setting, given as if from their own source so that checks see them.

    `run` on a `file://` upstream: one L0 file a second (`l0_interval` 1 s), so every second is a restore point, as
    with LiteFS Cloud and Litestream. A local write costs ~0.4 ms. Not 0 (each upload its own L0 file): a backlog
    is shipped as many uploads a second (and with `max_files_per_upload` at LiteFS's 256, 20 a second at 5,000
    tx/s), and the head object lists every L0 file since the last L1 (an L1 interval of them: 6,000, 1.3 MB
    rewritten after each flush, a quarter of a core).
    On S3 (requests cost money) and in `serve` (many databases) uploads are gathered for 10 s.

    `run`'s in-process engine keeps its state in `<sidecar.state_dir>/engine` unless `engine.state_dir` is given.
    """
    if "sidecar" in sections and "engine" in sections and "engine.state_dir" not in given:
        state = given.get("sidecar.state_dir")
        base = state.value if state is not None else _DEFAULT_TEXT["sidecar.state_dir"]
        given["engine.state_dir"] = _Given(f"{base}/engine", "default under sidecar.state_dir")
    if "sidecar" in sections and "engine" in sections and "engine.l0_interval" not in given:
        upstream = given.get("sidecar.upstream")
        url = upstream.value if upstream is not None else _DEFAULT_TEXT["sidecar.upstream"]
        if isinstance(url, str) and urlsplit(url).scheme == "file":
            given["engine.l0_interval"] = _Given(1.0, "default for a file:// upstream")


def load(sections: Sequence[str], *, config_file: str | None = None, env: Mapping[str, str] = os.environ,
         flags: Mapping[str, Any] | None = None) -> Config:
    """Build the requested sections from defaults < `config_file` < `env` < `flags`, or raise ConfigError.

    `flags` maps "section.field" to a typed value or a string, None meaning not given (see `flags_from_args`).
    Every problem is collected and raised at once, each naming the field, the value and its source.
    Unknown `LITEFS_SIDECAR_*` variables and unknown TOML tables or keys are problems too. A section or flag
    that names no setting is the caller's bug: ValueError.
    """
    for section in sections:
        if section not in SECTIONS:
            raise ValueError(f"unknown configuration section {section!r}")
    problems: list[str] = []
    given: dict[str, _Given] = {}
    if config_file is not None:
        _from_file(config_file, sections, given, problems)
    _from_env(env, sections, given, problems)
    _from_flags(flags or {}, sections, given)
    _contextual_defaults(sections, given)
    sources: dict[str, str] = {}
    built = {section: _build(section, given, sources, problems) for section in sections}
    if problems:
        raise ConfigError(problems)
    return Config(sections=built, sources=sources)


# --- argparse ---

_METAVARS = {"duration": "DURATION", "size": "SIZE", "int": "N", "path": "PATH", "URL": "URL",
             "host:port": "HOST:PORT"}  # plain strings are named after their field


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, section: str,
              fields: Sequence[str] | None = None) -> None:
    """Add a flag for each setting of `section` (or only `fields`); secrets get none.

    Flags default to None so that "not given" is detectable; `flags_from_args()` reads them back.
    """
    settings = {f.name: f for f in section_fields(section)}
    for name in fields or []:
        if name not in settings:
            raise ValueError(f"{section}.{name}: not a setting")
    for name, f in settings.items():
        meta = f.metadata
        if meta["secret"] or (fields is not None and name not in fields):
            continue
        default = meta["default_text"]
        help = f"{meta['help']} (default {_show(default) if default == '' else default}; " \
               f"env {env_name(section, name)})"
        kwargs: dict[str, Any] = {"dest": f"{section}.{name}", "default": None, "help": help.replace("%", "%%")}
        if meta["kind"] == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = _METAVARS.get(meta["type"], name.upper())
        parser.add_argument(flag_name(name, section), **kwargs)


def flags_from_args(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The flags of `section` that were given on the command line, as "section.field" → value, for `load()`."""
    out: dict[str, Any] = {}
    for f in section_fields(section):
        value = getattr(args, f"{section}.{f.name}", None)
        if value is not None:
            out[f"{section}.{f.name}"] = value
    return out


__all__ = [
    "ENV_PREFIX", "SECTIONS", "Config", "EngineConfig", "LogConfig", "ServeConfig", "SidecarConfig",
    "add_flags", "env_name", "flag_name", "flags_from_args", "load", "parse_duration", "parse_size",
    "section_fields",
]
