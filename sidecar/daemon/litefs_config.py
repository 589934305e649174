"""Start-up check of LiteFS's own configuration: beside the sidecar, LiteFS must neither prune nor back up.

LiteFS's retention monitor honours a high-water mark only from its built-in backup client, so with
`data.retention` > 0 (the default is 10m) it deletes LTX files the sidecar has not shipped. Its built-in backup
client (`backup:`, or `LITEFS_CLOUD_TOKEN` in its environment) would ship the same transactions elsewhere and
restore from there. The sidecar reads the same `litefs.yml` LiteFS would (docs/litefs.md §8) and reports both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

SEARCH = (Path("litefs.yml"), Path.home() / "litefs.yml", Path("/etc/litefs.yml"))
_GO_DURATION = re.compile(r"^([-+]?)((?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+|0)$")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def find(explicit: Path | None) -> Path | None:
    """The file LiteFS would read: `explicit`, else the first of ./litefs.yml, ~/litefs.yml, /etc/litefs.yml."""
    if explicit is not None:
        return explicit
    return next((p for p in SEARCH if p.is_file()), None)


def go_duration(text: str) -> float:
    """Seconds in a Go duration ("10m", "1h30m", "-1s", "0"); ValueError otherwise."""
    m = _GO_DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    total = sum(float(n) * _UNIT[u] for n, u in re.findall(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)", m.group(2)))
    return -total if m.group(1) == "-" else total


def check(path: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    """What in `path` (and LiteFS's environment twin) conflicts with running the sidecar; [] when all is well."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return [f"{path}: cannot read it to check LiteFS's retention: {err}"]
    if not isinstance(doc, dict):
        return [f"{path}: not a mapping"]
    problems = []
    data = doc.get("data") or {}
    retention = data.get("retention", "10m") if isinstance(data, dict) else "10m"
    try:
        if go_duration(str(retention)) > 0:
            default = " (the default)" if "retention" not in data else ""
            problems.append(f"{path}: data.retention is {retention}{default}; set it to 0s so that only the sidecar "
                            f"prunes, under the HWM")
    except ValueError:
        problems.append(f"{path}: data.retention {retention!r} is not a duration")
    http = doc.get("http") or {}
    timeout = http.get("snapshot-timeout", 0) if isinstance(http, dict) else 0
    try:
        if not problems and go_duration(str(retention)) <= 0 and go_duration(str(timeout)) <= 0:
            problems.append(f"{path}: http.snapshot-timeout defaults to data.retention, which is off; set it (for "
                            f"example to 10m) or every snapshot sent to a new replica times out at once")
    except ValueError:
        problems.append(f"{path}: http.snapshot-timeout {timeout!r} is not a duration")
    backup = doc.get("backup") or {}
    if isinstance(backup, dict) and backup.get("type"):
        problems.append(f"{path}: backup.type is {backup['type']!r}; remove the backup section when the sidecar ships")
    if env.get("LITEFS_CLOUD_TOKEN"):
        problems.append("LITEFS_CLOUD_TOKEN is set: it turns on LiteFS's built-in backup client; unset it for LiteFS")
    return problems


__all__ = ["SEARCH", "check", "find", "go_duration"]
