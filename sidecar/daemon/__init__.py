"""The sidecar daemon (`litefs-sidecar run`): watch a LiteFS data directory, ship, prune under the HWM."""

from sidecar.daemon.sidecar import Sidecar

__all__ = ["Sidecar"]
