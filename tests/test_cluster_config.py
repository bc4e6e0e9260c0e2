"""Where the jobs run: cluster.yaml for the cloud, checked with Ray's launcher validation, and the local Ray that
init_ray starts, which must listen on loopback only."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.ray_internals import LOCAL_ONLY_ENV
from tests.helpers import LOOPBACK, REPO, free_port, listening_sockets


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def launcher_check(config: dict) -> dict:
    """What `ray up` does with the file before it talks to the cloud: merge the provider defaults, then validate
    against the launcher's JSON schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_launchers_validation(cluster_yaml):
    config = launcher_check(cluster_yaml)
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # workers and labeling tasks go to the GPU nodes
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert [(t["min_workers"], t["resources"]["GPU"]) for t in workers] == [(0, 1), (0, 1)]
    assert all(t["max_workers"] >= 1 for t in workers)
    spot = config["available_node_types"]["gpu_spot_worker"]["node_config"]
    assert spot["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in config["available_node_types"]["gpu_worker"]["node_config"]
    assert any("pip install" in c and "~/imgjobs" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/imgjobs"] == "."
    # Token auth stays on and the dashboard stays on the head's loopback.
    assert all("RAY_AUTH_MODE=token ray start" in cmd[-1] for cmd in
               (config["head_start_ray_commands"], config["worker_start_ray_commands"]))
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


@pytest.mark.parametrize("path, typo", [
    ((), "setup_comands"),
    (("available_node_types", "gpu_worker"), "max_worker"),
    (("docker",), "worker_imag"),
    (("auth",), "ssh_usr"),
])
def test_a_typo_fails_validation(cluster_yaml, path, typo):
    config = copy.deepcopy(cluster_yaml)
    section = config
    for key in path:
        section = section[key]
    section[typo] = "x"
    with pytest.raises(jsonschema.ValidationError, match=typo):
        launcher_check(config)


@pytest.mark.ray
def test_local_ray_from_init_ray_listens_on_loopback_only_and_runs_workers_at_nice_0():
    """issue 5: a Ray that imgjobs starts itself (no RAY_ADDRESS, no live `ray start` cluster) binds to 127.0.0.1, its
    dashboard (training's) included. Its workers run at nice 0, where Ray's default is 15. The address of a cluster
    killed without `ray stop` is passed over with a warning: ray.init alone would wait minutes for its GCS."""
    script = ("import os, ray, sys\nfrom pipeline.cluster import init_ray\ninit_ray(training=True)\n"
              "print('ready', ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True)\nsys.stdin.read()\n")
    # Its own Ray temp dir (short: socket paths), so it cannot find and join a `ray start` cluster of this machine;
    # there, the address file of a cluster that is gone.
    tmp = tempfile.mkdtemp(prefix="imgjobs-ray-")
    gone = f"127.0.0.1:{free_port()}"
    Path(tmp, "ray").mkdir()
    Path(tmp, "ray", "ray_current_cluster").write_text(gone)
    # Nor may it inherit the loopback setting from this process: init_ray has to make it.
    env = {**{k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_worker_niceness", *LOCAL_ONLY_ENV}},
           "RAY_TMPDIR": tmp}
    try:
        with tempfile.TemporaryFile("w+") as stderr, \
                subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True) as driver:
            try:
                assert driver.stdout.readline().split() == ["ready", "0"]
                root = psutil.Process(driver.pid)
                sockets = listening_sockets([root, *root.children(recursive=True)])
            finally:
                driver.stdin.close()  # the driver then returns, and Ray stops what it started
                driver.wait(timeout=60)
            stderr.seek(0)
            warnings = [line for line in stderr if line.startswith("warning:")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert warnings == [f"warning: the Ray cluster `ray start` left at {gone} no longer runs on this machine; "
                        "starting a local Ray instead (set RAY_ADDRESS to join another cluster)\n"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert [s for s in sockets if s[1] not in LOOPBACK] == []
