"""Whether every training worker sees the run's storage: the driver writes a marker with a fresh token, and each
worker must read it back before it trains (Ray Train's own marker is written by each worker itself, so a local
path on a multi-node cluster passes it and checkpoints scatter over the nodes' disks)."""

from __future__ import annotations

import socket
import uuid

from pipeline import storage
from pipeline.errors import UsageError

MARKER = ".imgjobs-storage-marker"
NOT_SHARED = "is not shared storage"


def write_marker(run_dir: str, storage_path: str) -> dict:
    """The marker, written by the driver; a store that cannot be written fails here, in one line."""
    fs, base = storage.resolve(run_dir)
    token = uuid.uuid4().hex
    try:
        storage.write_bytes(fs, f"{base}/{MARKER}", token.encode())
    except OSError as e:
        raise UsageError(f"storage.path {storage_path} cannot be written: {str(e).splitlines()[0]}") from None
    return {"run_dir": run_dir, "token": token}


def check_marker(marker: dict, storage_path: str) -> None:
    fs, base = storage.resolve(marker["run_dir"])
    try:
        seen = storage.read_bytes(fs, f"{base}/{MARKER}").decode()
    except OSError:
        seen = None
    if seen != marker["token"]:
        raise RuntimeError(
            f"storage.path {storage_path} {NOT_SHARED}: a worker on {socket.gethostname()} cannot see the run's "
            f"folder {marker['run_dir']}; set storage.path to a place every node sees (s3://bucket/runs, gs://..., "
            "or an NFS mount)"
        )
