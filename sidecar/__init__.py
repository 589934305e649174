"""litefs-sidecar: self-hosted backups and point-in-time restore for LiteFS clusters."""

__version__ = "0.1.0"
