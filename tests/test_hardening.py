"""issue 33's smaller hardening: control characters never reach the terminal raw, a checkpoint's sizes are bounded,
a run's summary.json cannot point outside its folder, `imgjobs submit` uploads nothing that a link brings in from
outside, secrets stay out of git, and the cluster's workers hold a storage-only role."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from jobs.cli import main
from pipeline import submit
from pipeline.console import Console, printable
from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import ModelSpec
from tests.helpers import REPO

# A file name that sets the terminal's title, clears it, fakes a line of its own, and hides its extension behind a C1
# control and a right-to-left override; and its escaped form.
HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\r\ndone\x9b31m\u202etxt.jpg"
ESCAPED = "evil\\x1b]0;owned\\x07\\x1b[2J\\r\\ndone\\x9b31m\\u202etxt.jpg"


def test_console_lines_and_progress_escape_control_characters():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    Console(log).line(f"warning: skipped {HOSTILE}\udcff: broken")  # and a byte that is not UTF-8
    assert log.getvalue() == f"warning: skipped {ESCAPED}\\udcff: broken\n"
    console = Console(terminal)
    console.progress(f"label: {HOSTILE}")
    console.close()
    assert ESCAPED in terminal.getvalue() and not {"\x1b", "\x07", "\x9b", "\u202e"} & set(terminal.getvalue())
    assert printable("plain ants/é 日本.jpg, 5/10") == "plain ants/é 日本.jpg, 5/10"


def test_an_error_line_escapes_the_path_it_names(tmp_path, capfd):
    """One line, even for a name holding a newline."""
    missing = str(tmp_path / HOSTILE)
    assert main(["label", "--checkpoint", missing, "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert err == f"imgjobs label: error: checkpoint {tmp_path}/{ESCAPED} not found; pass a training run's folder " \
                  "or the best_checkpoint path from its summary.json\n"


SPEC = ModelSpec(arch="resnet18", head="fc", mean=[0.5] * 3, std=[0.5] * 3, resize_size=256, input_size=224)


@pytest.mark.parametrize("change, message", [
    ({"input_size": 4}, "model.input_size 4, outside 8..4096"),
    ({"input_size": 100_000}, "model.input_size 100000, outside 8..4096"),
    ({"input_size": True}, "model.input_size True, outside 8..4096"),
    ({"resize_size": 2**20}, "model.resize_size 1048576, outside 8..8192"),
    ({"resize_size": "256"}, "model.resize_size str, outside 8..8192"),
    ({"classes": ["only"]}, "classes 1, outside 2..100000"),
    ({"classes": [str(i) for i in range(100_001)]}, "classes 100001, outside 2..100000"),
])
def test_a_checkpoint_s_sizes_and_class_count_are_bounded(change, message, tmp_path):
    classes = change.pop("classes", ["a", "b"])
    path = checkpoint.save({"model": replace(SPEC, **change), "classes": classes, "model_state": {}}, str(tmp_path))
    with pytest.raises(UsageError, match=f"^checkpoint {path} has {message}; pass a checkpoint written by imgjobs"):
        checkpoint.load(path)


def test_a_checkpoint_at_the_bounds_loads(tmp_path):
    for size, resize, classes in ((8, 8, 2), (4096, 8192, 100_000)):
        state = {"model": replace(SPEC, input_size=size, resize_size=resize), "model_state": {},
                 "classes": [str(i) for i in range(classes)]}
        assert checkpoint.load(checkpoint.save(state, str(tmp_path)))["model"].input_size == size


def make_run(folder, best: str, run_dir: str | None = None) -> None:
    (folder / "checkpoint_000001").mkdir(parents=True)
    checkpoint.save({"model": SPEC, "classes": ["a", "b"], "model_state": {}}, str(folder / "checkpoint_000001"))
    (folder / "summary.json").write_text(json.dumps({"run_dir": run_dir or str(folder), "best_checkpoint": best}))


@pytest.mark.parametrize("best", ["{run}/../other/checkpoint.pt", "{tmp}/other/checkpoint.pt",
                                  "{run}/checkpoint_000001/../../other/checkpoint.pt",
                                  "s3://bucket/elsewhere/checkpoint.pt?endpoint_override=evil.example:9000"])
def test_a_summary_cannot_point_outside_its_run_folder(best, tmp_path, capfd):
    other = tmp_path / "other"
    other.mkdir()
    checkpoint.save({"model": SPEC, "classes": ["a", "b"], "model_state": {}}, str(other))
    run = tmp_path / "run"
    make_run(run, best.format(run=run, tmp=tmp_path))
    code = main(["label", "--checkpoint", str(run), "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 2 and err == (f"imgjobs label: error: checkpoint {run}: its summary.json names a best_checkpoint "
                                 "outside the run's folder; pass a checkpoint.pt itself, or a run folder that imgjobs "
                                 "train wrote\n")
    assert not (tmp_path / "out").exists()


def test_a_moved_run_folder_finds_its_own_best_checkpoint(tmp_path, monkeypatch):
    trained_at = tmp_path / "trained" / "run"
    make_run(trained_at, str(trained_at / "checkpoint_000001" / "checkpoint.pt"))
    moved = tmp_path / "moved" / "run"
    shutil.copytree(trained_at, moved)
    shutil.rmtree(trained_at)
    assert checkpoint.find(str(moved)) == str(moved / "checkpoint_000001" / "checkpoint.pt")
    monkeypatch.chdir(moved.parent)  # a relative folder stands for the same absolute path as before
    assert checkpoint.find("run") == str(moved / "checkpoint_000001" / "checkpoint.pt")


@pytest.fixture
def project(tmp_path):
    """A copy of what a job carries, beside files that must never travel."""
    root = tmp_path / "project"
    root.mkdir()
    for entry in submit.PACKAGE_CONTENT:
        source = REPO / entry
        if source.is_dir():
            shutil.copytree(source, root / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / entry)
    (tmp_path / "home" / ".aws").mkdir(parents=True)
    (tmp_path / "home" / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = x\n")
    (root / ".env").write_text("TOKEN=x\n")
    return root


@pytest.mark.parametrize("link, target, refused", [
    ("configs/site.yaml", "../../home/.aws/credentials", True),  # a file outside the project
    ("pipeline/extra", "../../home/.aws", True),  # a folder outside: Ray packs what is in it
    ("configs/env.yaml", "../.env", True),  # inside the project, but not among the files a job carries
    ("configs/alias.yaml", "demo.yaml", False),  # a file the job carries anyway
    ("configs/more", "../pipeline/label", False),
    ("configs/.site.yaml", "../../home/.aws/credentials", False),  # hidden names are left out of the upload
    ("configs/gone.yaml", "../../home/missing.yaml", False),  # a broken link uploads nothing
])
def test_submit_refuses_links_that_bring_files_from_outside(project, link, target, refused):
    (project / link).symlink_to(target)
    if refused:
        with pytest.raises(UsageError, match=f"^{link} links to .*, outside the files a job carries"):
            submit.check_links(project)
    else:
        submit.check_links(project)


def test_submit_checks_links_before_it_contacts_the_cluster(project):
    """The real command, run from the copy (its PROJECT_ROOT): refused in one line, before connecting (port 9 has
    no dashboard)."""
    (project / "configs" / "site.yaml").symlink_to(project.parent / "home" / ".aws" / "credentials")
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", "http://127.0.0.1:9", "--",
                             "train", "-c", "configs/demo.yaml"], cwd=project, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("imgjobs submit: error: configs/site.yaml links to ") and \
        result.stderr.count("\n") == 1, result.stderr
    assert "aws_secret_access_key" not in result.stdout + result.stderr


@pytest.mark.parametrize("path, ignored", [
    (".env", True), ("configs/.env.production", True), (".env.example", False), ("deploy/server.pem", True),
    ("tls.key", True), ("credentials", True), (".aws/config", True), ("service-account-prod.json", True),
    ("configs/demo.yaml", False), ("pipeline/formats/keys.py", False),
])
def test_gitignore_keeps_secrets_out(path, ignored):
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, timeout=30)
    assert result.returncode == (0 if ignored else 1)


def test_cluster_workers_get_a_storage_role_not_the_heads():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert "IamInstanceProfile" not in head["node_config"]  # ray up gives the head ray-autoscaler-v1
    profiles = {json.dumps(t["node_config"].get("IamInstanceProfile"), sort_keys=True) for t in types.values()}
    assert len(profiles) == 1 and "instance-profile/imgjobs-worker-storage" in profiles.pop()
