"""The backup engine: object storage as the source of truth, levels, HWM, retention, restore."""

from sidecar.engine.database import DbStatus
from sidecar.engine.engine import Engine
from sidecar.engine.index import DbIndex, FileEntry, restore_points, scan
from sidecar.engine.levels import Levels
from sidecar.engine.restore import RestoreResult, plan_restore, restore
from sidecar.engine.retention import retention_victims

__all__ = ["DbIndex", "DbStatus", "Engine", "FileEntry", "Levels", "RestoreResult", "plan_restore",
           "restore", "restore_points", "retention_victims", "scan"]
