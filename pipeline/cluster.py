"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on this machine."""

from __future__ import annotations

import logging
import os

import ray

from pipeline import ray_internals


def init_ray() -> None:
    """Join RAY_ADDRESS or the cluster `ray start` left on this machine; else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    # Keep worker print() lines as plain stdout: Ray Train otherwise echoes each one twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = ray_internals.existing_cluster_address()
    if address is None:  # a new local Ray: on loopback only
        ray_internals.bind_to_loopback()
        ray_internals.quiet_token_notice()
    elif ray_internals.runs_on_this_machine(address):
        ray_internals.present_token_if_any()
    # A local Ray gets no dashboard: nobody opens it for a one-command run, and on a 2-CPU machine its processes
    # cost a second of start-up and CPU throughout. `ray start --head` gives one, and imgjobs then joins it.
    ray.init(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False if address is None else None)


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))
