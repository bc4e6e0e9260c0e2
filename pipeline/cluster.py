"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on this machine."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import ray
import yaml

from pipeline import ray_internals, ray_output

STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the autoscaler's config on the head


def init_ray(training: bool = False) -> bool:
    """Join RAY_ADDRESS or the cluster `ray start` left on this machine; else start a local Ray on 127.0.0.1.
    False when this process was connected already.

    A local Ray gets a dashboard for training only: Ray Train's placement-group cleaner queries the state API it
    serves, while a labeling job has no use for one, and on a small machine its processes cost start-up and CPU.
    `ray start --head` gives one, and imgjobs then joins it. Likewise the job's runtime env: training's workers
    need setup_worker, and a joined cluster's workers the storage variables, while the workers of a Ray that this
    process starts inherit its environment. Labeling there runs without one: any runtime env makes Ray start new
    workers for the job rather than use the ones it prestarts. Training's own Ray starts its workers at nice 0, not
    Ray's 15: there the training worker is the job, and at 15 it and its loader processes yield the CPU to the
    driver and Ray's daemons whenever those wake (benchmarks/RESULTS.md#train_throughput)."""
    if ray.is_initialized():
        return False
    # Keep worker print() lines as plain stdout: Ray Train otherwise echoes each one twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = ray_internals.existing_cluster_address()
    gone = ray_internals.gone_cluster_address()
    if gone:
        print(f"warning: the Ray cluster `ray start` left at {gone} no longer runs on this machine; starting a "
              "local Ray instead (set RAY_ADDRESS to join another cluster)", file=sys.stderr, flush=True)
    ray_output.quiet_driver()
    if address is None:  # a new local Ray: on loopback only
        ray_internals.bind_to_loopback()
        if training:
            os.environ.setdefault("RAY_worker_niceness", "0")
    elif ray_internals.runs_on_this_machine(address):
        if ray_internals.runs_token_auth(address):
            ray_internals.present_token_if_any()
        else:
            ray_internals.present_no_token()
    runtime_env = {"worker_process_setup_hook": setup_worker, "env_vars": storage_environment()}
    # "local" skips a gone cluster's address; a live cluster Ray finds again itself, as one it joins by its token.
    ray.init(address="local" if address is None else None, logging_level=logging.WARNING, log_to_driver=True,
             include_dashboard=training if address is None else None,
             runtime_env=runtime_env if address is not None or training else None)
    ray_output.drop_forwarded_notices()
    return True


def storage_environment() -> dict[str, str]:
    """The S3 endpoint set in this process's environment (MinIO, Ceph, R2): the job's workers read and write
    the same storage, whichever node they run on. A submitted job got it at submission (pipeline.submit)."""
    if ray_internals.in_submitted_job():
        return {}
    return {name: os.environ[name] for name in STORAGE_VARIABLES if name in os.environ}


def setup_worker() -> None:
    """Runs in every worker process of a training job, and of any job on a joined cluster. Ray Train's helper
    actors query the state API with no address, which fails when a second Ray runs on the machine: RAY_ADDRESS
    tells them which one is theirs."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ray_output.quiet_worker()


def use_gpus(setting: bool | str, say: Callable[[str], None], who: str) -> bool:
    """scaling.use_gpu as a job on the connected Ray runs it: `auto` chosen by gpu_choice, and said in one line
    that starts with `who` (the run's name, or the command)."""
    if setting != "auto":
        return bool(setting)
    chosen, why = gpu_choice()
    say(f"{who}: scaling.use_gpu auto: {'GPU' if chosen else 'CPU'} workers ({why})")
    return chosen


def gpu_choice() -> tuple[bool, str]:
    """What `scaling.use_gpu: auto` means, and why: GPUs when some are up, or when the cluster's autoscaler can add
    GPU nodes; CPUs otherwise."""
    up = ray.cluster_resources().get("GPU", 0)
    if up:
        return True, f"{up:g} GPU(s) up"
    can_add = autoscaler_gpus()
    if can_add:
        return True, f"none up yet, the autoscaler can add {can_add:g}"
    return False, "no GPU up, and no autoscaler config here offers GPU nodes; set scaling.use_gpu=true to wait for them"


def autoscaler_gpus() -> float:
    """GPUs the autoscaler can add: by the cluster config it reports to the GCS (KubeRay's does), else by the
    config `ray up` leaves on the head, where the drivers of submitted jobs run."""
    reported = ray_internals.autoscaler_max_resources().get("GPU", 0)
    if reported:
        return reported
    launcher_config = Path(LAUNCHER_CONFIG).expanduser()
    if not launcher_config.is_file():
        return 0
    node_types = (yaml.safe_load(launcher_config.read_text()) or {}).get("available_node_types", {})
    return sum(t.get("resources", {}).get("GPU", 0) * t.get("max_workers", 0) for t in node_types.values())
