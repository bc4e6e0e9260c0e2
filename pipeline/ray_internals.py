"""The private Ray APIs imgjobs uses, each only where no public API does the job, each behind one small function.
tests/test_ray_internals.py fails when a Ray release changes one of them."""

from __future__ import annotations

import logging
import os
import re

import psutil
import ray
from ray._private import ray_constants, services
from ray._private.authentication import authentication_token_setup
from ray._raylet import AuthenticationTokenLoader, Config

# Ray's single-node mode (meant for macOS/Windows): the node address becomes 127.0.0.1, so the GCS, raylet,
# agents, workers and dashboard listen on loopback only instead of on every interface. ray.init has no public
# option for it (_node_ip_address="127.0.0.1" still binds the machine's address). For `ray start`, pass it in
# the environment together with --node-ip-address=127.0.0.1.
LOCAL_ONLY_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
TOKEN_SETUP_LOGGER = authentication_token_setup.__name__  # it announces token auth on every start or join


def bind_to_loopback() -> None:
    """Make the local Ray this process starts next listen on 127.0.0.1 only."""
    os.environ.update(LOCAL_ONLY_ENV)  # inherited by every process the new Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported ray


def existing_cluster_address() -> str | None:
    """What imgjobs joins: RAY_ADDRESS, or the cluster `ray start` left on this machine while it still runs here;
    None for a new Ray of its own. Ray decides this inside ray.init and exposes no public way to ask first."""
    return None if gone_cluster_address() else services.canonicalize_bootstrap_address(None)


def gone_cluster_address() -> str | None:
    """The address `ray start` left in Ray's temp dir when no Ray process of that cluster runs here any more: a
    cluster killed without `ray stop` (a crash, an OOM kill). ray.init() would wait minutes for its GCS and fail."""
    if os.environ.get(ray_constants.RAY_ADDRESS_ENVIRONMENT_VARIABLE):
        return None
    address = services.find_bootstrap_address(None)
    return address if address and not runs_on_this_machine(address) else None


def runs_on_this_machine(address: str) -> bool:
    """Whether a GCS address belongs to a Ray running on this machine."""
    return address in services.find_gcs_addresses()


def runs_token_auth(address: str) -> bool:
    """Whether the Ray at `address`, on this machine, checks tokens: the mode its processes were started with
    (RAY_AUTH_MODE in their environment, which Ray sets in the clusters it starts with token auth). Ray offers no
    way to ask a cluster before joining it; a cluster whose processes cannot be read counts as checking tokens."""
    for process in psutil.process_iter(["cmdline"]):
        if f"--gcs-address={address}" in (process.info["cmdline"] or []):
            try:
                return process.environ().get(authentication_token_setup.AUTH_MODE_ENV_VAR, "").lower() == "token"
            except psutil.Error:  # exited meanwhile, or another user's
                continue
    return True


def present_no_token() -> None:
    """Join without a token, even with one in ~/.ray: a cluster that checks none (ray.cluster_utils', or one started
    with RAY_AUTH_MODE=disabled) cancels the actors of a driver that presents one. An explicit RAY_AUTH_MODE still
    decides."""
    if authentication_token_setup.AUTH_MODE_ENV_VAR not in os.environ:
        os.environ[authentication_token_setup.AUTH_MODE_ENV_VAR] = "disabled"  # this process and the ones it starts
        Config.initialize("")  # the mode this process has cached


def present_token_if_any() -> None:
    """Ray presents the token by itself only to a cluster it finds without RAY_ADDRESS; this makes it present it to
    any cluster that runs on this machine. An explicit RAY_AUTH_MODE still decides."""
    authentication_token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def token_header() -> dict:
    """The cluster token from wherever Ray keeps it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), as
    the HTTP header Ray's dashboard checks; {} without a token. Ray's job client sends it only with
    RAY_AUTH_MODE=token set, and has no public accessor."""
    return AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True)


def drop_forwarded_lines(pattern: re.Pattern) -> None:
    """Workers' output reaches the driver's terminal through one handler of Ray's, which prints it; Ray offers no
    filter. Wrap that handler so lines matching `pattern` stay in Ray's log files only. Call after ray.init."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def filtered(handler):
        def handle(batch: dict) -> None:
            lines = [line for line in batch["lines"] if not pattern.search(line)]
            if lines:
                handler({**batch, "lines": lines})

        return handle

    with dispatcher._lock:
        dispatcher.handlers = [(name, filtered(handler) if name == "ray_print_logs" else handler)
                               for name, handler in dispatcher.handlers]


def train_report_logger() -> logging.Logger:
    """The logger of Ray Train's per-report INFO line ("Reporting training result N: TrainingReport(...)"). It is
    named by its file's path, not its module, so Ray Train's own log level does not reach it. Found by path so
    that processes which never train need not import Ray Train to quiet it."""
    return logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                          "context.py"))


def autoscaler_max_resources() -> dict:
    """The most of each resource the cluster's autoscaler says it can scale to, by the cluster config it reports to
    the GCS (Ray Train reads the same to refuse requests no node type can meet); {} where none was reported."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or {}


def in_submitted_job() -> bool:
    """Whether this process is the driver of a job submitted through the Jobs API, whose runtime env (set at
    submission) Ray merges with the one ray.init passes and refuses to merge on any overlap."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def worker_exceptions(failed: Exception) -> list[BaseException]:
    """What the training workers raised, by rank, from the error trainer.fit() raised: Ray Train passes each one on
    as the worker raised it (WorkerGroupError.worker_failures, an alpha API, unwrapped from the traceback wrapper
    Ray Train's worker puts it in). Where it could not (a worker that died, an exception that did not
    deserialize), Ray's own error stands in and only its text tells; a failure of Ray Train's controller has none."""
    failures = getattr(failed, "worker_failures", None) or {}
    return [failures[rank] for rank in sorted(failures)]
