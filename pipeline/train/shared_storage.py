"""Whether every training worker sees the run's storage: the driver writes a marker with a fresh token, and each
worker must read it back before it trains (Ray Train's own marker is written by each worker itself, so a local
path on a multi-node cluster passes it and checkpoints scatter over the nodes' disks)."""

from __future__ import annotations

import socket
import uuid

from pipeline import storage
from pipeline.errors import UsageError

MARKER = ".imgjobs-storage-marker"


class NotShared(UsageError):
    """A worker cannot see the run's folder: storage.path is on a disk of the driver's node only. Raised on the
    worker; Ray Train hands it to the driver (pipeline.ray_internals.worker_exceptions), which stops with it."""


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
    """On each worker, before it trains: the driver's marker must be there, with its token."""
    fs, base = storage.resolve(marker["run_dir"])
    try:
        seen = storage.read_bytes(fs, f"{base}/{MARKER}").decode()
    except OSError:
        seen = None
    if seen != marker["token"]:
        raise NotShared(
            f"storage.path {storage_path} is not shared storage: a worker on {socket.gethostname()} cannot see the "
            f"run's folder {marker['run_dir']}; set storage.path to a place every node sees (s3://bucket/runs, "
            "gs://..., or an NFS mount)"
        )
