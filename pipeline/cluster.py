"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on this machine."""

from __future__ import annotations

import logging
import os

import ray


def init_ray() -> None:
    """Join RAY_ADDRESS or the cluster `ray start` left on this machine; else start a local Ray."""
    if ray.is_initialized():
        return
    # Keep worker print() lines as plain stdout: Ray Train otherwise echoes each one twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(logging_level=logging.WARNING, log_to_driver=True)


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))
