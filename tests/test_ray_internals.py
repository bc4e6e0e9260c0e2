"""The private Ray APIs behind pipeline.ray_internals still do what imgjobs relies on: a Ray release that changes
one fails here, by name, instead of somewhere in a job."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys

import pytest
import ray
from ray._private import ray_constants

from pipeline import ray_internals
from pipeline.errors import UsageError
from pipeline.ray_output import QUIET_LOGGERS
from tests.helpers import REPO, LocalCluster


def test_loopback_mode_is_still_ray_s_single_node_switch():
    from ray._private import ray_constants

    assert ray_internals.LOCAL_ONLY_ENV == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    # In a fresh process: bind_to_loopback flips the constant this process already read from the environment.
    code = ("from ray._private import ray_constants; from pipeline import ray_internals; "
            "ray_internals.bind_to_loopback(); assert ray_constants.ENABLE_RAY_CLUSTER is False")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={"PATH": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})


def test_a_running_ray_is_found_on_this_machine(ray_local):
    address = ray_local.get_runtime_context().gcs_address
    assert ray_internals.runs_on_this_machine(address)
    assert not ray_internals.runs_on_this_machine("127.0.0.1:1")


def test_ray_address_is_what_ray_init_would_join(monkeypatch):
    # In loopback mode, as imgjobs runs a Ray of its own; elsewhere Ray swaps 127.0.0.1 for this machine's address.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    assert ray_internals.existing_cluster_address() == "127.0.0.1:6390"


def test_a_cluster_ray_start_left_is_joined_only_while_it_runs_here(monkeypatch, tmp_path, ray_local):
    """Ray's address file outlives a cluster killed without `ray stop`; ray.init() would wait minutes for its GCS."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    address_file = tmp_path / "ray" / "ray_current_cluster"
    address_file.write_text(ray_local.get_runtime_context().gcs_address)  # a Ray that runs on this machine
    assert ray_internals.gone_cluster_address() is None
    assert ray_internals.existing_cluster_address() == ray_local.get_runtime_context().gcs_address
    address_file.write_text("127.0.0.1:1")  # no Ray process of it here
    assert ray_internals.gone_cluster_address() == "127.0.0.1:1"
    assert ray_internals.existing_cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # named by the user: joined, and a failure to join is Ray's
    assert ray_internals.gone_cluster_address() is None
    assert ray_internals.existing_cluster_address() == "127.0.0.1:1"


def test_the_token_becomes_the_header_ray_s_dashboard_checks(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()
    try:
        headers = ray_internals.token_header()
    finally:
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        AuthenticationTokenLoader.instance().reset_cache()
    assert headers == {"authorization": f"Bearer {'a' * 64}"}


def test_ray_is_the_release_these_internals_were_checked_against():
    ray_internals.present_token_if_any()  # no token, no RAY_AUTH_MODE: does nothing, raises nothing
    assert ray.__version__ == "2.60.0", "new Ray: check pipeline/ray_internals.py against it, then update this pin"


@pytest.mark.parametrize("name", sorted(QUIET_LOGGERS))
def test_each_logger_quieted_is_the_one_its_ray_module_logs_with(name):
    """A Ray release that renames a module would leave its notices on the console: this fails first."""
    module = importlib.import_module(name)
    assert logging.getLogger(name) in [value for value in vars(module).values() if isinstance(value, logging.Logger)]


def test_the_train_report_logger_is_the_one_ray_train_logs_reports_with():
    from ray.train.v2._internal.execution import context

    assert context.logger is ray_internals.train_report_logger()


def test_a_submitted_job_is_told_by_ray_s_job_config_variable(monkeypatch):
    assert not ray_internals.in_submitted_job()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert ray_internals.in_submitted_job()


@pytest.mark.ray
def test_autoscaler_max_resources_are_those_of_the_config_reported_to_the_gcs():
    """What an autoscaler that reports its cluster config (KubeRay's) tells the GCS, through the GCS's own RPC."""
    cluster = LocalCluster({"num_cpus": 0}, [])
    code = """
import grpc, json, ray
from ray.core.generated import autoscaler_pb2 as pb, autoscaler_pb2_grpc
from pipeline import ray_internals
ray.init()
before = ray_internals.autoscaler_max_resources()
gcs = autoscaler_pb2_grpc.AutoscalerStateServiceStub(grpc.insecure_channel(ray.get_runtime_context().gcs_address))
config = pb.ClusterConfig(node_group_configs=[pb.NodeGroupConfig(name="gpu", resources={"CPU": 4, "GPU": 1},
                                                                 max_count=3)])
gcs.ReportClusterConfig(pb.ReportClusterConfigRequest(cluster_config=config),
                        metadata=list(ray_internals.token_header().items()))
print(json.dumps([before, ray_internals.autoscaler_max_resources()]))
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**cluster.env(), "RAY_AUTH_MODE": "token"},
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        cluster.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [{}, {"CPU": 12, "GPU": 3}]


def test_what_a_training_worker_raises_reaches_the_driver_as_raised(ray_local, tmp_path):
    """imgjobs train tells a worker's UsageError (the storage check's) from other failures by its type."""
    from ray.train import ControllerError, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    def refuse(config):
        raise UsageError("the worker's own")

    trainer = TorchTrainer(refuse, scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                           run_config=RunConfig(name="refused", storage_path=str(tmp_path),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(TrainingFailedError) as failed:
        trainer.fit()
    [raised] = ray_internals.worker_exceptions(failed.value)
    assert type(raised) is UsageError and str(raised) == "the worker's own"
    assert ray_internals.worker_exceptions(ControllerError(RuntimeError("lost"))) == []
