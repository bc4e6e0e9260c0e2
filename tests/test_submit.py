"""`imgjobs submit` against a real Ray head started here: loopback only, token auth on, its own temp dir and ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from jobs.cli import main
from pipeline import submit
from pipeline.formats import checkpoint
from pipeline.ray_internals import LOCAL_ONLY_ENV
from tests.helpers import DEMO_DATA, LOOPBACK, REPO, free_port, listening_sockets, session_processes

BIN = Path(sys.executable).parent
CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def environment(**extra: str) -> dict:
    """This environment without any Ray address or auth setting (so nothing leaks in), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}
    return {**env, **extra}


@dataclass
class Head:
    address: str
    gcs_port: int
    process: subprocess.Popen
    token_path: Path


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own session, so stopping it reaches every process it started."""
    tmp = Path(tempfile.mkdtemp(prefix="imgjobs-head-"))  # short: Ray's socket paths below it must fit 107 bytes
    token_path = tmp / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    ports = ["--port", gcs_port, "--dashboard-port", dashboard_port, "--ray-client-server-port", free_port(),
             "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
             "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port()]
    env = environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), **LOCAL_ONLY_ENV,
                      PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # job entrypoints run `python` from PATH
    log = tmp / "head.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", "--temp-dir", str(tmp), "--num-cpus=2", "--num-gpus=0",
             "--disable-usage-stats", *map(str, ports)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_jobs_api(address, token_path.read_text(), process, log)
        yield Head(address, gcs_port, process, token_path)
    finally:
        stop_session(process)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_jobs_api(address: str, token: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(f"{address}/api/jobs/", headers={"authorization": f"Bearer {token}"}, timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"the Jobs API at {address} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop what it started; whatever is left in its session after a while
    (workers can take half a minute to exit) is killed."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    left = session_processes(process.pid)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=10)


def run_submit(head: Head, *job: str, cwd: Path, options=(), **env: str) -> subprocess.CompletedProcess:
    """`imgjobs submit` as a user runs it. No RAY_AUTH_MODE: the client has to find the token by itself."""
    return subprocess.run(
        [str(BIN / "imgjobs"), "submit", "--address", head.address, *options, "--", *job],
        env=environment(RAY_AUTH_TOKEN_PATH=str(head.token_path), **env), cwd=cwd,
        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(ray_head, tmp_path_factory) -> dict:
    """A 1-epoch demo training submitted to the head. data/ does not travel with the job, so data.root is absolute:
    on this one-machine cluster the head sees the repository's copy."""
    storage = tmp_path_factory.mktemp("cluster-runs")
    started = time.monotonic()
    result = run_submit(ray_head, "train", "-c", "configs/demo.yaml", "train.epochs=1", f"data.root={DEMO_DATA}",
                        f"storage.path={storage}", cwd=storage)
    return {"result": result, "seconds": time.monotonic() - started, "run_dir": storage / "demo"}


def test_submitted_training_succeeds_and_writes_its_run(trained):
    result = trained["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"^job (raysubmit_\w+) submitted to http://127\.0\.0\.1:\d+$", result.stdout, re.M)[1]
    assert result.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED")
    assert re.search(r"^working_dir: \d+ files, [\d.]+ KiB", result.stdout, re.M)
    assert str(trained["run_dir"]) in result.stdout  # the job's own last line, streamed back
    summary = json.loads((trained["run_dir"] / "summary.json").read_text())
    assert summary["classes"] == ["ants", "bees"]
    assert [epoch["epoch"] for epoch in summary["epochs"]] == [1]
    best = checkpoint.load(summary["best_checkpoint"])
    assert best["classes"] == ["ants", "bees"] and best["model"].arch == "efficientnet_lite0"
    print(f"train submit round trip: {trained['seconds']:.1f}s")


@pytest.mark.skipif(not (REPO / "jobs" / "label.py").exists(), reason="the labeling job is not there yet")
def test_submitted_labeling_uses_the_trained_checkpoint(ray_head, trained, tmp_path):
    summary = json.loads((trained["run_dir"] / "summary.json").read_text())
    output = tmp_path / "labels"
    val = DEMO_DATA / "val"
    started = time.monotonic()
    result = run_submit(ray_head, "label", "--checkpoint", summary["best_checkpoint"], "--input", str(val),
                        "--output", str(output), "--evaluate", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^job raysubmit_\w+ SUCCEEDED$", result.stdout, re.M)
    labels = json.loads((output / "_summary.json").read_text())["runs"][-1]
    images = sum(1 for p in val.rglob("*") if p.is_file())
    assert labels["total"] == images and labels["errors"] == 0
    assert labels["accuracy"] >= 0.8  # ImageNet features separate ants from bees even after one epoch
    print(f"label submit round trip: {time.monotonic() - started:.1f}s")


def test_submitted_labeling_on_s3_with_the_endpoint_from_this_shell(ray_head, trained, s3_server, tmp_path):
    """A checkpoint, inputs and output on S3, as a submitted job: AWS_ENDPOINT_URL set only in the shell that
    submits travels with the job. (Training from S3 into S3 is tested in-process in test_s3 and across nodes in
    test_multinode; the endpoint travels the same way for either job.)"""
    data = s3_server.upload(DEMO_DATA / "val", "submit/hymenoptera/val").split("?")[0]
    best = json.loads((trained["run_dir"] / "summary.json").read_text())["best_checkpoint"]
    checkpoint_uri = s3_server.upload(Path(best), "submit/runs/demo/checkpoint.pt").split("?")[0]
    endpoint = {"AWS_ENDPOINT_URL": f"http://{s3_server.endpoint}"}
    result = run_submit(ray_head, "label", "--checkpoint", checkpoint_uri, "--input", data,
                        "--output", "s3://submit/labels", "--evaluate", cwd=tmp_path, **endpoint)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with s3_server.filesystem().open_input_stream("submit/labels/_summary.json") as f:
        labels = json.loads(f.read())["runs"][-1]
    assert labels["total"] == 153 and labels["errors"] == 0 and labels["accuracy"] >= 0.8


def test_failing_job_exits_non_zero_with_the_jobs_error(ray_head, tmp_path):
    missing = tmp_path / "no-such-data"
    result = run_submit(ray_head, "train", "-c", "configs/demo.yaml", f"data.root={missing}",
                        f"storage.path={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2  # the job's own exit code: a usage error on the cluster
    error_line = result.stderr.strip().splitlines()[-1]
    assert re.match(r"imgjobs submit: job raysubmit_\w+ FAILED \(exit code 2\): imgjobs train: error: data\.root: ",
                    error_line), result.stderr
    assert str(missing) in error_line


def test_no_wait_detaches_and_the_printed_ray_command_follows_the_job(ray_head, tmp_path):
    missing = tmp_path / "no-such-data"
    result = run_submit(ray_head, "train", "-c", "configs/demo.yaml", f"data.root={missing}",
                        f"storage.path={tmp_path}", cwd=tmp_path, options=["--no-wait"])
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[-1]
    command = re.search(r"^follow it with: (.+)$", result.stdout, re.M)[1]
    assert command == f"RAY_AUTH_MODE=token ray job logs --follow {job_id} --address {ray_head.address}"
    ray, *arguments = command.removeprefix("RAY_AUTH_MODE=token ").split()
    logs = subprocess.run([str(BIN / ray), *arguments], capture_output=True, text=True, timeout=300,
                          env=environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_head.token_path)))
    assert logs.returncode == 0, logs.stderr
    assert f"data.root: {missing} has no train/ folder" in logs.stdout


def test_a_wrong_token_is_refused_with_one_line(ray_head, tmp_path):
    result = run_submit(ray_head, "train", "-c", "configs/demo.yaml", cwd=tmp_path, RAY_AUTH_TOKEN="0" * 64)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "refused the request" in result.stderr and "auth_token" in result.stderr


def test_head_and_its_workers_listen_on_loopback_only(ray_head, trained):
    sockets = listening_sockets(session_processes(ray_head.process.pid))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert [s for s in sockets if s[1] not in LOOPBACK] == []


def test_init_ray_joins_a_token_cluster_of_this_machine_named_by_ray_address(ray_head):
    """ray.init presents the token by itself only to a cluster it finds without RAY_ADDRESS."""
    script = "import ray\nfrom pipeline.cluster import init_ray\ninit_ray()\nprint(ray.cluster_resources()['CPU'])"
    env = environment(RAY_ADDRESS=f"127.0.0.1:{ray_head.gcs_port}", RAY_AUTH_TOKEN_PATH=str(ray_head.token_path),
                      **LOCAL_ONLY_ENV)  # the head listens on 127.0.0.1 only: look for it there
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "2.0"


def test_the_job_s_working_dir_holds_only_code_and_configs(ray_head, trained):
    """What Ray unpacked on the cluster for the submitted job: exactly package_files(), no data, runs or tests."""
    packages = ray_head.token_path.parent / "session_latest" / "runtime_resources" / "working_dir_files"
    unpacked = [p for p in packages.glob("_ray_pkg_*") if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    names = sorted(p.relative_to(unpacked[0]).as_posix() for p in unpacked[0].rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    assert names == sorted(submit.package_files())
    assert {"pyproject.toml", "jobs/cli.py", "pipeline/submit.py", "pipeline/train/loop.py",
            "configs/demo.yaml"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in {".git", ".venv", "data", "runs", "tests"}]


def test_address_comes_from_flag_then_environment_then_default(monkeypatch):
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.resolve_address(None) == "http://head:8265"
    assert submit.resolve_address("http://other:8265") == "http://other:8265"


def test_token_goes_to_this_machine_by_default_and_elsewhere_only_when_asked():
    """In a fresh process: Ray's token loader caches, and this one may hold the session's Ray."""
    script = ("import json\nfrom pipeline.submit import auth_headers\n"
              "print(json.dumps([auth_headers(a) for a in ('http://127.0.0.1:8265', 'http://head.example:8265')]))")

    def headers(**env: str) -> list[dict]:
        result = subprocess.run([sys.executable, "-c", script], env=environment(RAY_AUTH_TOKEN="a" * 64, **env),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    bearer = {"authorization": "Bearer " + "a" * 64}
    assert headers() == [bearer, {}]
    assert headers(RAY_AUTH_MODE="token") == [bearer, bearer]
    assert headers(RAY_AUTH_MODE="disabled") == [{}, {}]


@pytest.mark.parametrize("job, message", [
    ([], "name the job after --"),
    (["submit", "--", "train"], "name the job after --"),
    (["train", "-c", str(REPO.parent / "my.yaml")], "does not travel with the job"),
    (["train", "-c", "configs/demo.yaml", "train.epochs=0"], "train.epochs"),
])
def test_job_mistakes_are_usage_errors_before_any_upload(job, message, capsys):
    # Port 9 (discard) has no dashboard: reaching it would be a different error.
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", *job]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_no_cluster_at_the_address_is_one_line(capsys):
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "train", "-c",
                 "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray dashboard answers" in err
