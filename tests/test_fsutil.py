"""`atomic_output` and `write_atomically`: the old file or the new one, never a mix, and no temp file left."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.fsutil import atomic_output, write_atomically


def test_a_block_that_ends_well_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_output(path) as f:
        f.write(b"new ")
        assert path.read_bytes() == b"old"  # nothing is seen under the name until the block ends
        f.write(b"bytes")
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_block_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_output(path) as f:
        f.write(b"half")
        raise RuntimeError("half way")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomically_makes_the_directory_and_writes_text_or_bytes(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "state" / "deep" / "pos.json"
    write_atomically(path, '{"txid": 1}', durable=durable)
    assert path.read_text() == '{"txid": 1}'
    write_atomically(path, b"\x00\x01", durable=durable)
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["pos.json"]
