"""The watcher's batches of new files: those LiteFS named in sequence are taken by name, the rest one by one."""

from __future__ import annotations

import shutil
from pathlib import Path

import watchfiles

from sidecar.config import SidecarConfig
from sidecar.daemon import Sidecar
from sidecar.daemon.upstream import HTTPUpstream
from sidecar.emulator import EmulatedNode
from sidecar.ltx import format_filename


def _sidecar(node: EmulatedNode, tmp_path: Path) -> tuple[Sidecar, HTTPUpstream]:
    config = SidecarConfig(data_dir=node.data_dir, mount_dir=node.mount_dir, upstream="http://127.0.0.1:9",
                           state_dir=tmp_path / "state", metrics_addr="")
    upstream = HTTPUpstream(config.upstream, "", "default")  # never called: only the watcher's events are fed
    return Sidecar(config, upstream, None), upstream


def _txids(paths: list[Path]) -> list[int]:
    return [int(p.name[17:33], 16) for p in paths]


async def test_a_batch_is_learnt_whole_in_sequence_and_out_of_it(tmp_path: Path) -> None:
    node = EmulatedNode(tmp_path / "data", tmp_path / "mount")
    try:
        node.execute("app.db", "CREATE TABLE t (x)")
        sidecar, upstream = _sidecar(node, tmp_path)
        try:
            sidecar.discover()
            local = sidecar.dbs["app.db"].local
            held = [f.max_txid for f in local.oldest()]
            for i in range(20):
                node.execute("app.db", "INSERT INTO t VALUES (?)", (i,))
            files = node.ltx_files("app.db")
            # Out of sequence: a file after a gap (as a file moved in by hand, or one LiteFS wrote while the
            # listing was taken), which no probe by name reaches.
            gap = _txids(files)[-1] + 5
            stray = files[-1].with_name(format_filename(gap, gap))
            shutil.copyfile(files[-1], stray)
            new = [p for p in files if int(p.name[17:33], 16) > held[-1]] + [stray]
            # a set, as watchfiles gives it: in no order, with several events per file
            events = {(watchfiles.Change.added, str(p)) for p in new} | \
                     {(watchfiles.Change.modified, str(p)) for p in new}
            sidecar._changed(events)
            assert [f.max_txid for f in local.oldest()] == held + _txids(new)
            assert local.head is not None and local.head.path == stray
        finally:
            await upstream.close()
    finally:
        node.close()
