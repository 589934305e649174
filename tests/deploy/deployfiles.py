"""Readers for the deploy files (units, Dockerfiles, env files, compose values) and the check that a
`litefs-sidecar …` command line found in one of them runs: the live CLI parses it, and the configuration it names
loads through `sidecar.config.load` with the environment the deploy file gives it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar import config as cfgmod
from sidecar.cli import build_parser
from sidecar.server import parse_tokens

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROGRAM = "litefs-sidecar"

# --- command lines ---


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _is_operator(word: str) -> bool:
    return bool(word) and all(c in "();<>|&" for c in word)


_PREFIXES = {"exec", "sudo", "env", "nohup", "time"}


def sidecar_argv(words: list[str]) -> list[str] | None:
    """The arguments of the first `litefs-sidecar` (or a path ending in it) run as a command in a split shell
    line, up to the next shell operator; None if there is none. `systemctl status litefs-sidecar` has none."""
    at_command = True
    for i, word in enumerate(words):
        if _is_operator(word):
            at_command = True
        elif at_command and word.rsplit("/", 1)[-1] == PROGRAM:
            argv = []
            for w in words[i + 1:]:
                if _is_operator(w):
                    break
                argv.append(w)
            return argv
        elif not (re.fullmatch(r"\w+=.*", word) or word in _PREFIXES):
            at_command = False
    return None


def commands_in_shell(text: str) -> list[list[str]]:
    """Every `litefs-sidecar …` invocation in shell text: scripts, or ```sh blocks (backslash continuations joined)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = _words(line)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        argv = sidecar_argv(words)
        if argv is not None:
            out.append(argv)
    return out


def shell_blocks(markdown: str) -> str:
    """The contents of the ```sh / ```bash / ```console blocks of a markdown document."""
    blocks = re.findall(r"^[ \t]*```(?:sh|bash|shell|console)\n(.*?)^[ \t]*```", markdown, flags=re.M | re.S)
    return "\n".join(blocks)


@dataclass(frozen=True)
class Checked:
    """A command line that parsed, and the configuration it loads."""

    argv: list[str]
    command: str
    config: cfgmod.Config | None


def check_command(argv: list[str], env: Mapping[str, str], files: Mapping[str, Path] | None = None) -> Checked:
    """Parse `argv` with the real CLI and load its configuration as the command would; AssertionError if either fails.

    `files` maps paths the command sees (inside a container, under /etc) to the repository files installed there.
    """
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`{PROGRAM} {shlex.join(argv)}` does not parse: {err.getvalue().strip()}") from exc
    assert callable(getattr(args, "func", None)), f"`{PROGRAM} {shlex.join(argv)}` names no command"
    names = vars(args)
    sections = [s for s in cfgmod.SECTIONS if any(k.startswith(f"{s}.") for k in names)]
    if not sections:
        return Checked(argv, args.command, None)
    config_file = names.get("config")
    if config_file is not None:
        mapped = (files or {}).get(config_file)
        assert mapped is not None, f"`{PROGRAM} {shlex.join(argv)}`: nothing installs {config_file}"
        assert mapped.is_file(), f"{config_file} is installed from {mapped}, which does not exist"
        config_file = str(mapped)
    flags = {k: v for s in sections for k, v in cfgmod.flags_from_args(args, s).items()}
    loaded = cfgmod.load(sections, config_file=config_file, env=env, flags=flags)
    if "server" in sections:
        tokens = parse_tokens(loaded.server.tokens, "LITEFS_SIDECAR_SERVER_TOKENS")  # SidecarError if malformed
        assert tokens or loaded.server.tokens_file or loaded.server.insecure_no_auth, "serve: no cluster tokens"
    return Checked(argv, args.command, loaded)


# --- file formats ---


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= and docker's env files read them (quotes stripped)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=value: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), …]}: keys may repeat, and an empty value is kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {raw!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not Key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    flags: tuple[str, ...]


def dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, `--flag`s of COPY/ADD split off."""
    out = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        flags = []
        while keyword.upper() in ("COPY", "ADD") and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
        out.append(Instruction(keyword.upper(), rest.strip(), tuple(flags)))
    return out


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; AssertionError for the shell form, which swallows signals."""
    try:
        value = json.loads(instruction.args)
    except ValueError:
        raise AssertionError(f"{instruction.keyword} {instruction.args}: not the exec (JSON) form") from None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def copies(path: Path) -> Iterator[tuple[str, str]]:
    """(source in the build context, destination in the image) of each COPY without --from."""
    for ins in dockerfile(path):
        if ins.keyword == "COPY" and not any(f.startswith("--from") for f in ins.flags):
            *sources, dest = shlex.split(ins.args)
            for src in sources:
                yield src, dest


def installed_files(path: Path, context: Path) -> dict[str, Path]:
    """Image path → repository file, for the single-file COPYs of a Dockerfile built in `context`."""
    return {dest: context / src for src, dest in copies(path) if not dest.endswith("/")}


_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `$$`, with `env` standing for the shell environment."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        return env.get(name) or (m.group(2) or "")
    return _INTERPOLATION.sub(sub, value)


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go `time.ParseDuration` string, as LiteFS reads durations from litefs.yml."""
    s = str(text).strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    parts = list(_GO_DURATION.finditer(s))
    assert parts and "".join(p.group(0) for p in parts) == s, f"{text!r}: not a Go duration"
    return sign * sum(float(p.group(1)) * _GO_UNITS[p.group(2)] for p in parts)


def host_port(url_or_addr: str) -> tuple[str, int]:
    """("host", port) of `http://host:port/…` or `host:port` (`[::]` for IPv6)."""
    rest = url_or_addr.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


def secret_names(text: str) -> set[str]:
    """LITEFS_SIDECAR_* names assigned in text (comments included): what a file tells the user to set."""
    return set(re.findall(r"\b(LITEFS_SIDECAR_[A-Z0-9_]+)=", text))


def known_env_names() -> set[str]:
    return {cfgmod.env_name(s, f.name) for s in cfgmod.SECTIONS for f in cfgmod.section_fields(s)}


# --- litefs.yml, as LiteFS 0.5 reads it (cmd/litefs/config.go: env expansion, then strict YAML) ---

LITEFS_SCHEMA: dict[str, object] = {
    "exit-on-error": bool, "skip-sync": bool, "strict-verify": bool,
    "exec": [{"cmd": str, "if-candidate": bool}],
    "data": {"dir": str, "compress": bool, "retention": "duration", "retention-monitor-interval": "duration"},
    "fuse": {"dir": str, "allow-other": bool, "debug": bool},
    "http": {"addr": str, "snapshot-timeout": "duration"},
    "proxy": {"addr": str, "target": str, "db": str, "max-lag": "duration", "debug": bool, "passthrough": [str],
              "always-forward": [str], "primary-redirect-timeout": "duration", "read-timeout": "duration",
              "read-header-timeout": "duration", "write-timeout": "duration", "idle-timeout": "duration"},
    "lease": {"type": str, "hostname": str, "advertise-url": str, "candidate": bool, "promote": bool,
              "reconnect-delay": "duration", "demote-delay": "duration", "databases": [str],
              "consul": {"url": str, "key": str, "ttl": "duration", "lock-delay": "duration"}},
    "backup": {"type": str, "path": str, "url": str, "cluster": str, "auth-token": str},
    "log": {"format": str, "timestamp": bool, "debug": bool},
    "tracing": {"enabled": bool, "path": str, "max-size": int, "max-count": int, "compress": bool},
}

_EXPR = re.compile(r"""^(\w+)\s*(==|!=)\s*(?:'(.*)'|"(.*)"|(\w+))$""")


def litefs_expand(text: str, env: Mapping[str, str]) -> str:
    """LiteFS's ExpandEnv: Go's os.Expand of `${VAR}`/`$VAR`, where `${A == 'x'}` and `${A == B}` become true/false."""
    def value(name: str) -> str:
        name = name.strip()
        m = _EXPR.match(name)
        if m is None:
            return env.get(name, "")
        other = m.group(3) if m.group(3) is not None else m.group(4) if m.group(4) is not None else \
            env.get(m.group(5), "")
        equal = env.get(m.group(1), "") == other
        return str(equal if m.group(2) == "==" else not equal).lower()
    return re.sub(r"\$\{([^}]*)\}|\$(\w+)", lambda m: value(m.group(1) if m.group(1) is not None else m.group(2)),
                  text)


def check_litefs_schema(doc: object, schema: object = LITEFS_SCHEMA, where: str = "") -> list[str]:
    """What LiteFS's strict decoder would reject: unknown keys and values of the wrong type."""
    problems: list[str] = []
    if isinstance(schema, dict):
        if not isinstance(doc, dict):
            return [f"{where or 'litefs.yml'}: want a mapping"]
        for key, value in doc.items():
            if key not in schema:
                problems.append(f"{where}{key}: unknown key (LiteFS refuses to start)")
            else:
                problems += check_litefs_schema(value, schema[key], f"{where}{key}.")
    elif isinstance(schema, list):
        if not isinstance(doc, list):
            return [f"{where.rstrip('.')}: want a list"]
        for i, item in enumerate(doc):
            problems += check_litefs_schema(item, schema[0], f"{where}{i}.")
    elif schema == "duration":
        try:
            go_duration(str(doc))
        except AssertionError:
            problems.append(f"{where.rstrip('.')}: {doc!r} is not a duration")
    elif isinstance(schema, type) and not isinstance(doc, schema):
        problems.append(f"{where.rstrip('.')}: {doc!r} is not a {schema.__name__}")
    return problems
