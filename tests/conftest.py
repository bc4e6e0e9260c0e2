"""Shared fixtures: one real local Ray for the session, generated image folders, the real ants/bees data, an S3 API
server; and the tiers. `make test` runs everything; `make test-fast` (pytest --fast) runs the tests that start no
Ray, and fails any that does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.helpers import (
    DEMO_DATA,
    NO_RAY_ADDRESS,
    REPO,
    SHARED_DATA,
    fresh_env,
    make_image_folder,
    random_weight_checkpoint,
    s3_api_server,
)

# Every process of the session, Ray's workers included, talks to the S3 API server below with made-up
# credentials, and never asks an instance-metadata service for real ones.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})


# The session's Ray, and the modules' own clusters.
RAY_FIXTURES = {"ray_local", "ray_head", "cluster", "autoscaling"}


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="the edit loop's tier: only tests that start no Ray, and any that does fails")


def pytest_configure(config):
    if config.getoption("--fast"):
        os.environ["RAY_ADDRESS"] = NO_RAY_ADDRESS  # a command a test starts fails at once if it starts Ray

        def refuse(*args, **kwargs):
            raise RuntimeError("the fast tier starts no Ray: mark the test `ray` (tests/conftest.py)")

        ray.init = refuse


def pytest_collection_modifyitems(config, items):
    """Tests on the session's Ray are `ray` tests by their fixtures; others that start Ray are marked by hand. On a
    machine without a GPU, `gpu` tests are skipped, saying so."""
    has_gpu = torch_cuda_available()
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)"))
    if config.getoption("--fast"):
        slow = [item for item in items if item.get_closest_marker("ray")]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("ray")]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def ray_local():
    """One real Ray instance for every test that needs it (start-up costs seconds); stopped at the end."""
    from pipeline.ray_internals import bind_to_loopback

    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    bind_to_loopback()
    # With the dashboard: Ray Train's placement-group cleaner queries the state API it serves, and
    # without it decides the run is dead and tears the workers down. address="local": an instance of its own,
    # even while another cluster runs on this machine.
    from pipeline.cluster import setup_worker

    # num_gpus=0: tests on the session's Ray mean CPU workers and actors, on a GPU machine too; `gpu` tests ask for
    # the GPU themselves.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"worker_process_setup_hook": setup_worker})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory) -> dict:
    """The demo config trained briefly on the repo's ants/bees copy, as a user's first run: a process and a local
    Ray of its own, beside the session's. Its summary (a real pretrained checkpoint for labeling tests), with what it
    printed under `stdout` and `stderr`."""
    storage = tmp_path_factory.mktemp("demo-runs")
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "-c", "configs/demo.yaml", "train.epochs=2",
                             f"data.root={DEMO_DATA}", f"storage.path={storage}"], cwd=REPO, env=fresh_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((storage / "demo" / "summary.json").read_text())
    return summary | {"stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> str:
    """A random-weight MobileNetV3-small checkpoint for classes blue and red, at 64 pixels."""
    return random_weight_checkpoint("mobilenet_v3_small", ["blue", "red"], tmp_path_factory.mktemp("ckpt"),
                                    input_size=64)


@pytest.fixture(scope="session")
def shared_hymenoptera() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test needs ../shared/data/hymenoptera, which is absent here ({SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server on 127.0.0.1 for the session, stopped at the end."""
    with s3_api_server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server
