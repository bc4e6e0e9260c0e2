"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on this machine."""

from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants, services
from ray._private.authentication import authentication_token_setup

# Ray's single-node mode (meant for macOS/Windows): the node address becomes 127.0.0.1, so the GCS, raylet,
# agents, workers and dashboard listen on loopback only instead of on every interface. For `ray start`, pass it
# in the environment together with --node-ip-address=127.0.0.1.
LOCAL_ONLY_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}


def bind_to_loopback() -> None:
    """Make the local Ray this process starts next listen on 127.0.0.1 only."""
    os.environ.update(LOCAL_ONLY_ENV)  # inherited by every process the new Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported ray


def init_ray() -> None:
    """Join RAY_ADDRESS or the cluster `ray start` left on this machine; else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    # Keep worker print() lines as plain stdout: Ray Train otherwise echoes each one twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = services.canonicalize_bootstrap_address(None)  # None: ray.init will start a new Ray
    if address is None:
        bind_to_loopback()
        # Ray announces on every local start that token auth is on (it is, and stays on): noise in a job's output.
        logging.getLogger(authentication_token_setup.__name__).setLevel(logging.ERROR)
    elif address in services.find_gcs_addresses():
        # Ray presents the token by itself only to a cluster it finds without RAY_ADDRESS; a cluster that runs on
        # this machine gets it when RAY_ADDRESS names it, too. An explicit RAY_AUTH_MODE still decides.
        authentication_token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    # A local Ray gets no dashboard: nobody opens it for a one-command run, and on a 2-CPU machine its processes
    # cost a second of start-up and CPU throughout. `ray start --head` gives one, and imgjobs then joins it.
    ray.init(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False if address is None else None)


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))
