"""The start-up check of litefs.yml: retention must be off and the built-in backup absent beside the sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.daemon.litefs_config import check, go_duration
from tests.daemon.conftest import Env

GOOD = """\
fuse: {dir: /litefs}
http: {snapshot-timeout: 10m}
data:
  dir: /var/lib/litefs
  retention: 0s
lease: {type: static, candidate: true}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "litefs.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, env, expect", [
    (GOOD, {}, []),
    (GOOD.replace("0s", "-1s"), {}, []),
    (GOOD.replace("http: {snapshot-timeout: 10m}\n", ""), {}, ["http.snapshot-timeout defaults to data.retention"]),
    (GOOD.replace("  retention: 0s\n", ""), {}, ["data.retention is 10m (the default)"]),
    (GOOD.replace("0s", "10m"), {}, ["data.retention is 10m; set it to 0s"]),
    (GOOD.replace("0s", "soon"), {}, ["data.retention 'soon' is not a duration"]),
    (GOOD + "backup: {type: litefs-cloud, auth-token: x}\n", {}, ["backup.type is 'litefs-cloud'"]),
    (GOOD, {"LITEFS_CLOUD_TOKEN": "x"}, ["LITEFS_CLOUD_TOKEN is set"]),
    ("data: [\n", {}, ["cannot read it"]),
])
def test_check(tmp_path: Path, text: str, env: dict[str, str], expect: list[str]) -> None:
    problems = check(write(tmp_path, text), env)
    assert len(problems) == len(expect)
    for problem, want in zip(problems, expect, strict=True):
        assert want in problem


def test_a_file_not_in_utf8_is_reported_not_raised(tmp_path: Path) -> None:
    """A Latin-1 comment in litefs.yml: one problem naming the file, not a UnicodeDecodeError that stops `run`."""
    path = tmp_path / "litefs.yml"
    path.write_bytes(GOOD.replace("0s", "0s  # caf\u00e9").encode("latin-1"))
    [problem] = check(path, {})
    assert problem.startswith(f"{path}: cannot read it")


def test_go_durations() -> None:
    assert go_duration("1h30m") == 5400 and go_duration("-1s") == -1 and go_duration("0") == 0
    assert go_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        go_duration("10 minutes")


async def test_the_sidecar_reports_a_bad_litefs_yml_at_start(env: Env, tmp_path: Path) -> None:
    sidecar = await env.start(litefs_config=write(tmp_path, GOOD.replace("0s", "10m")))
    assert sidecar.metrics.errors.labels("litefs_config")._value.get() == 1
