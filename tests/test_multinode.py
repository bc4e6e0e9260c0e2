"""Both jobs across nodes, on a cluster shaped like cluster.yaml: a head that advertises no CPUs, and worker
nodes with their own resources (each its own raylet on this machine), with storage in S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.formats import checkpoint
from tests.helpers import (
    REPO,
    AutoscalingCluster,
    HeldImage,
    LocalCluster,
    make_image_folder,
    random_weight_checkpoint,
    read_output,
    start_label,
    wait_for_checkpoint,
    write_config,
)

pytestmark = pytest.mark.ray

HEAD = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"}  # the state API, for Ray Train


def start_train(config, env: dict) -> subprocess.Popen:
    """`imgjobs train -c CONFIG` as its own process, standard error merged into its output."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "-c", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_lines(proc: subprocess.Popen, count: int) -> list[str]:
    """The process's next `count` output lines of its own, past the autoscaler's event lines that Ray prints in
    any driver (a scale-down left from the test before may land in this one)."""
    lines = []
    while len(lines) < count:
        line = proc.stdout.readline()
        assert line, lines
        if "(autoscaler +" not in line:
            lines.append(line)
    return lines


def read_until(proc: subprocess.Popen, text: str) -> list[str]:
    """The process's output lines up to the first that contains `text`; fails if the output ends first."""
    lines = []
    while not lines or text not in lines[-1]:
        lines.append(proc.stdout.readline())
        assert lines[-1], lines
    return lines


def actor_nodes(cluster: LocalCluster | AutoscalingCluster, name: str, alive: bool = False) -> set[str]:
    """The nodes that ran actors whose name (class, or Ray Data's operator name) contains `name` (with `alive`,
    that run them now), from the cluster's state API, in a process of its own: this one is connected to the
    session's Ray."""
    code = ("import json; from ray.util.state import list_actors; print(json.dumps("
            "[[a.class_name, a.repr_name, a.node_id, a.state] for a in list_actors(limit=10000)]))")
    out = subprocess.run([sys.executable, "-c", code], env={**cluster.env(), "RAY_AUTH_MODE": "token"},
                         capture_output=True, text=True, check=True)
    actors = json.loads(out.stdout.strip().splitlines()[-1])
    return {node for class_name, repr_name, node, state in actors
            if name in f"{class_name} {repr_name}" and (state == "ALIVE" or not alive)}


class TestTwoNodes:
    """Tests on one 2-worker cluster, stopped once they are done, so it does not idle beside the clusters of the
    tests after them."""

    @pytest.fixture(scope="class")
    @classmethod
    def cluster(cls):
        cluster = LocalCluster(HEAD, [{"num_cpus": 1}, {"num_cpus": 1}])
        yield cluster
        cluster.stop()

    def test_training_on_two_nodes_into_s3_then_labeling_on_both(self, cluster, s3_server, tmp_path):
        folder = make_image_folder(tmp_path / "data", train_per_class=8, val_per_class=4)
        data = s3_server.upload(folder, "data/multinode")
        config = write_config(tmp_path / "c.json", "multinode", folder, tmp_path, train={"epochs": 1, "batch_size": 4},
                              scaling={"num_workers": 2, "use_gpu": False})
        train = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "-c", str(config), f"data.root={data}",
                                f"storage.path={s3_server.uri('runs')}"], cwd=REPO, env=cluster.env(),
                               capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        with s3_server.filesystem().open_input_stream("runs/multinode/summary.json") as f:
            summary = json.loads(f.read())
        assert summary["world_size"] == 2 and summary["nodes"] == 2  # one worker on each 1-CPU node
        assert summary["best_checkpoint"].startswith("s3://runs/multinode/")

        images = make_image_folder(tmp_path / "more", train_per_class=60, val_per_class=0) / "train"
        label = start_label(["--checkpoint", summary["best_checkpoint"], "--input",
                             s3_server.upload(images, "data/more"), "--output", s3_server.uri("labels/multinode"),
                             "--batch-size", "4"], cluster.env(), stderr=subprocess.STDOUT)
        out = label.communicate(timeout=600)[0]
        assert label.returncode == 0, out[-3000:]
        rows = s3_server.labels("labels/multinode")
        assert len(rows) == len({r["path"] for r in rows}) == 120 and not [r for r in rows if r["error"]]
        assert len(actor_nodes(cluster, "MapBatches(Predictor)")) == 2


    def test_an_audit_trains_its_folds_side_by_side(self, cluster, tmp_path):
        """audit.method train on two 1-CPU workers: the cluster holds both fold runs at once, and Ray Train runs them
        from the audit's threads, each line named by its run. (That those threads run at once: test_audit.)"""
        folder = make_image_folder(tmp_path / "data", train_per_class=6, val_per_class=2)
        config = write_config(tmp_path / "c.json", "folds", folder, tmp_path / "runs",
                              train={"epochs": 2, "batch_size": 4}, audit={"folds": 2, "method": "train"})
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "audit", "-c", str(config)], cwd=REPO,
                                env=cluster.env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        lines = result.stdout.splitlines()
        assert "audit: 2 fold runs, 2 at a time on this cluster" in lines, result.stdout
        for run in ("fold-1-of-2", "fold-2-of-2"):
            assert len([line for line in lines if line.startswith(f"{run}: epoch ") and "val loss" in line]) == 2, run
        assert "fold-1-of-2: 8 train / 8 val images, classes ['blue', 'red']" in lines, result.stdout  # named once
        assert len(read_output(tmp_path / "runs" / "folds" / "audit")) == 16

    def test_storage_that_workers_cannot_see_is_one_line_exit_2(self, cluster, tmp_path):
        """Separate disks, made real: the driver runs in a mount namespace of its own with a tmpfs over storage.path,
        so the marker it writes there is invisible to the workers, as a head's local disk is to worker nodes."""
        folder = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
        private = tmp_path / "private"
        private.mkdir()
        config = write_config(tmp_path / "c.json", "scattered", folder, private,
                              scaling={"num_workers": 2, "use_gpu": False}, train={"max_failures": 0})
        command = f"mount -t tmpfs imgjobs-test {private} && exec {sys.executable} -m jobs.cli train -c {config}"
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", command], cwd=REPO,
                                env=cluster.env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("imgjobs train: error: ")]
        assert errors and errors[0].startswith(f"imgjobs train: error: storage.path {private} is not shared storage: "
                                               "a worker on "), result.stderr[-3000:]


def test_a_machine_with_a_token_joins_a_cluster_that_checks_none(ray_local, small_checkpoint, tmp_path):
    """Once any local Ray has run (the session's has), ~/.ray/auth_token exists and imgjobs presents it to clusters
    on this machine; one that checks no token (ray.cluster_utils' kind, as in Ray's own tests) is joined without
    it. Clusters with token auth: the other tests here."""
    assert (Path.home() / ".ray" / "auth_token").is_file()
    plain = LocalCluster({"num_cpus": 2}, [], token=False)
    try:
        images = make_image_folder(tmp_path / "imgs", train_per_class=4, val_per_class=0)
        proc = start_label(["--checkpoint", small_checkpoint, "--input", str(images), "--output", str(tmp_path / "out"),
                            "--batch-size", "4"], plain.env(), stderr=subprocess.STDOUT)
        out = proc.communicate(timeout=600)[0]
    finally:
        plain.stop()
    assert proc.returncode == 0, out[-3000:]
    assert len(read_output(tmp_path / "out")) == 8


@pytest.fixture(scope="module")
def autoscaling():
    """cluster.yaml at rest: a head with no CPUs, no workers, and an autoscaler that may add up to 2 CPU nodes and
    a GPU node (a GPU in name only: the tests only wait for it)."""
    cluster = AutoscalingCluster({"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                                          "max_workers": 2},
                                  "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                          "max_workers": 1}})
    yield cluster
    cluster.stop()


def test_labeling_from_zero_workers_waits_then_runs_on_a_node_the_autoscaler_adds(autoscaling, s3_server, tmp_path):
    """The job says what it waits for and does not crash; the autoscaler adds a node for its first actor, and the
    job labels every image once. An image held back keeps the job going until that node is up, however fast it is.
    The pool's growth to a second node is not asserted: since reads go by unit (12 folders here), it came in only
    some runs on these 2 cores (issue 23's note)."""
    autoscaling.wait_until_at_rest()
    model = random_weight_checkpoint("resnet18", ["blue", "red"], tmp_path)
    folders = tuple(f"f{i:02d}" for i in range(12))
    images = make_image_folder(tmp_path / "imgs", classes=folders, train_per_class=50, val_per_class=0) / "train"
    held = HeldImage(s3_server, (images / "f00" / "f00_000.jpg").read_bytes())  # listed last, a unit of its own
    proc = start_label(["--checkpoint", model, "--input", str(images), held.uri, "--output", str(tmp_path / "out"),
                        "--batch-size", "4", "--max-actors", "2"], autoscaling.env(), stderr=subprocess.STDOUT)
    try:
        first = job_lines(proc, 2)
        assert "waiting for a worker node with CPUs" in first[-1] and "grows to 2 actor(s)" in first[-1], first
        deadline = time.monotonic() + 300
        while not actor_nodes(autoscaling, "MapBatches(Predictor)"):
            assert proc.poll() is None, "".join(first) + proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no node came up for the first actor"
            time.sleep(1)
        held.release()
        out = proc.communicate(timeout=600)[0]
    finally:
        held.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["runs"][-1]["labeled"] == 601


def test_training_from_zero_workers_waits_then_runs_on_nodes_the_autoscaler_adds(autoscaling, tmp_path):
    """A 2-worker run on a cluster at rest says what it waits for and finishes on two new nodes."""
    autoscaling.wait_until_at_rest()
    folder = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    config = write_config(tmp_path / "c.json", "fromzero", folder, tmp_path / "runs",
                          scaling={"num_workers": 2, "use_gpu": False})
    proc = start_train(config, autoscaling.env())
    first = job_lines(proc, 2)
    # A node that the labeling test before asked for may come up meanwhile: "0 up now" or "1 up now".
    assert first[-1].startswith("fromzero: waiting for 2 CPU(s) for the training workers, "), first
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "runs" / "fromzero" / "summary.json").read_text())["nodes"] == 2


def test_use_gpu_auto_waits_for_the_gpu_nodes_the_autoscaler_can_add(autoscaling, tmp_path):
    """At rest no GPU is up; `auto` finds the GPU node type in the autoscaler's config on the head and waits for a
    GPU worker rather than train on CPU."""
    autoscaling.wait_until_at_rest()
    folder = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    config = write_config(tmp_path / "c.json", "auto", folder, tmp_path / "runs", scaling={"use_gpu": "auto"})
    proc = start_train(config, {**autoscaling.env(), "HOME": str(autoscaling.home)})
    try:
        lines = job_lines(proc, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert lines[1] == "auto: scaling.use_gpu auto: GPU workers (none up yet, the autoscaler can add 1)\n", lines
    assert lines[2].startswith("auto: waiting for 1 GPU(s) for the training workers, 0 up now"), lines


def node_index(cluster: LocalCluster, hosts: set[str]) -> int:
    """The index (for remove_node) of a live worker node among `hosts`."""
    return next(i for i, node in enumerate(cluster.nodes) if node in hosts and node in cluster.alive)


@pytest.fixture(scope="module")
def lossy_cluster():
    # Ray Train polls for drained nodes every second instead of five, so a spot notice comes early in an epoch.
    cluster = LocalCluster(HEAD, [{"num_cpus": 1}] * 3, env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})
    yield cluster
    cluster.stop()


@pytest.fixture
def lossy(lossy_cluster):
    """Three 1-CPU worker nodes, one of which a test loses; the node it lost is replaced after it."""
    yield lossy_cluster
    while len(lossy_cluster.alive) < 3:
        lossy_cluster.add_node(num_cpus=1)


def test_training_survives_losing_a_worker_node(lossy, tmp_path):
    """A node running a training worker dies hard mid-run: Ray Train restarts the group on the nodes left, from
    the latest checkpoint, and the run finishes every epoch, none missing or repeated. Its storage is this
    machine's disk, which every node sees, as with an NFS mount: the shared-storage check passes on each start."""
    proc = None
    try:
        folder = make_image_folder(tmp_path / "data", train_per_class=60, val_per_class=10)
        config = write_config(tmp_path / "c.json", "nodeloss", folder, tmp_path / "runs",
                              scaling={"num_workers": 2}, train={"epochs": 5})
        proc = start_train(config, lossy.env())
        wait_for_checkpoint(tmp_path / "runs" / "nodeloss")
        lossy.remove_node(node_index(lossy, actor_nodes(lossy, "RayTrainWorker", alive=True)))
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        assert "resuming after epoch" in out, out[-3000:]
        summary = json.loads((tmp_path / "runs" / "nodeloss" / "summary.json").read_text())
        assert [m["epoch"] for m in summary["epochs"]] == [1, 2, 3, 4, 5]
        assert summary["world_size"] == 2 and summary["nodes"] == 2  # one worker on each of two 1-CPU nodes
    finally:
        if proc and proc.poll() is None:  # whatever failed, the job this test started stops with it
            proc.kill()


def test_labeling_survives_losing_a_drained_node_each_input_once(lossy, small_checkpoint, s3_server, tmp_path):
    """A node running a predictor actor is drained for preemption (Ray then places nothing new on it), then dies
    hard mid-job with its actor still on it: Ray Data restarts the actor and re-runs its tasks on the nodes left,
    the writer drops rows it already holds, and the job ends by itself, every input once. (A loss without the
    notice takes the same path from the loss on; its own run was cut for the suite's time.)"""
    proc = held = None
    try:
        images = make_image_folder(tmp_path / "imgs", train_per_class=500, val_per_class=0) / "train"
        # listed last, a unit of its own: the job outlasts the node on any machine
        held = HeldImage(s3_server, (images / "red" / "red_000.jpg").read_bytes())
        proc = start_label(["--checkpoint", small_checkpoint, "--input", str(images), held.uri, "--output",
                            str(tmp_path / "out"), "--batch-size", "8", "--max-actors", "2", "--rows-per-file", "100"],
                           lossy.env(), stderr=subprocess.STDOUT)
        read_until(proc, "first labeled batch")
        victim = node_index(lossy, actor_nodes(lossy, "MapBatches(Predictor)", alive=True))
        lossy.preempt_node(victim, 2)
        time.sleep(3)
        lossy.remove_node(victim)
        held.release()
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        rows = read_output(tmp_path / "out")
        assert sorted(r["path"] for r in rows) == sorted([*map(str, images.rglob("*.jpg")), held.key])
        assert not [r for r in rows if r["error"]]
    finally:
        if proc and proc.poll() is None:  # whatever failed, the job this test started stops with it
            proc.kill()
        if held:
            held.close()


def test_spot_preemption_saves_mid_epoch_and_resumes_there_with_the_weights_of_an_unbroken_run(lossy, tmp_path):
    """A node running a training worker is drained for preemption (the spot notice) during an epoch of 16 steps, then
    lost once the workers have saved a checkpoint mid-epoch on the notice. The restarted run goes on from that step,
    and ends with the weights of the same run unbroken, on the same cluster shape. A full-size ResNet-50 makes the
    steps slow enough for the notice to land mid-epoch; the workers look after every step. (With 8 steps, a loaded
    2-core CI machine once passed the notice, which Ray polls for each second, only at the epoch's last step.)"""
    proc = None
    try:
        folder = make_image_folder(tmp_path / "data", train_per_class=32, val_per_class=2, size=96)
        runs = tmp_path / "runs"
        # 16 steps an epoch on each of 2 workers.
        train = {"epochs": 2, "batch_size": 2, "preemption_check_seconds": 0}
        model = {"arch": "resnet50", "weights": "none", "mode": "finetune"}
        config = write_config(tmp_path / "c.json", "spot", folder, runs, scaling={"num_workers": 2}, model=model,
                              train={**train, "max_failures": 0})
        proc = start_train(config, lossy.env())
        lines = read_until(proc, "epoch 1/2  train loss")
        # The workers' line relay stays with the driver: on a lost node, it would fail every restarted worker.
        assert not actor_nodes(lossy, "_QueueActor") & set(lossy.nodes)
        victim = node_index(lossy, actor_nodes(lossy, "RayTrainWorker", alive=True))
        reclaim_at = time.monotonic() + 1
        lossy.preempt_node(victim, 1)
        lines += read_until(proc, "preemption notice: saving a checkpoint at epoch 2")
        wait_for_checkpoint(runs / "spot", lambda metrics: metrics.get("step", 0) > 0)
        time.sleep(max(0.0, reclaim_at - time.monotonic()))  # Ray counts the loss as a preemption from the deadline
        lossy.remove_node(victim)
        out = "".join(lines) + proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        summary = json.loads((runs / "spot" / "summary.json").read_text())
        assert [m["epoch"] for m in summary["epochs"]] == [1, 2]
        assert len(summary["interruptions"]) == 1, out[-4000:]  # max_failures 0: paid from the preemption budget
        [interruption] = summary["interruptions"]
        assert interruption["reason"] == "preemption" and interruption["epoch"] == 2, interruption
        assert 0 < interruption["step"] < 16, interruption
        assert f"resuming after epoch 2 step {interruption['step']} (preemption" in out, out[-4000:]

        unbroken = write_config(tmp_path / "u.json", "unbroken", folder, runs, scaling={"num_workers": 2}, model=model,
                                train=train)
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "-c", str(unbroken)], cwd=REPO,
                                env=lossy.env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        if proc and proc.poll() is None:  # whatever failed, the job this test started stops with it
            proc.kill()
    resumed = checkpoint.load(summary["latest_checkpoint"])["model_state"]
    straight = checkpoint.load(json.loads((runs / "unbroken" / "summary.json").read_text())["latest_checkpoint"])
    assert all(torch.equal(resumed[k], straight["model_state"][k]) for k in resumed)
    assert [m["train_images"] for m in summary["epochs"]] == [64] * 2  # every image once per epoch
