"""What a new user sees: only imgjobs' own lines, instant answers to mistakes, progress that says when."""

from __future__ import annotations

import ast
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from pipeline.console import Console, duration
from tests.helpers import REPO, fresh_env, make_image_folder, start_label

NOISE = re.compile(r"Failed to query|TrainingReport\(|core_worker\.cc|Traceback")
HEAVY = ("torch", "torchvision", "timm", "ray")


def test_demo_training_prints_only_its_own_lines(demo_run):
    """A user's first run starts a Ray of its own, beside another Ray on the machine here (the session's: a Ray that
    ray.init starts is not one that jobs join), and prints only its own lines."""
    out = demo_run["stdout"] + demo_run["stderr"]
    assert not NOISE.findall(out), [line for line in out.splitlines() if NOISE.search(line)][:5]
    lines = demo_run["stdout"].strip().splitlines()
    assert lines[0].startswith("demo: 245 train / 153 val images")
    assert re.search(r"^epoch 1/2  step \d+/16  [\d.]+ img/s  ETA \d+:\d\d epoch, \d+:\d\d run$", demo_run["stdout"],
                     re.M)
    assert re.search(r"^epoch 2/2  train loss [\d.]+ acc [\d.]+  val loss", demo_run["stdout"], re.M)
    run_dir = demo_run["run_dir"]
    assert lines[-1] == f"run in {run_dir}; label with it: imgjobs label --checkpoint {run_dir} --input IMAGES " \
                        f"--output {run_dir}/labels"
    assert not re.search(r"\(\w+ pid=\d+", out), "a Ray worker's line reached the terminal"


def run_cli(*args: str) -> tuple[int, str, list[str], float]:
    """The command in a fresh interpreter: exit code, stderr, which heavy modules it imported, seconds."""
    code = ("import sys\nfrom jobs.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            f"    rc = e.code\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\nsys.exit(rc)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=fresh_env(), capture_output=True,
                            text=True, timeout=120)
    *err, imported = result.stderr.strip().splitlines()
    return result.returncode, "\n".join(err), ast.literal_eval(imported), time.perf_counter() - started


@pytest.mark.parametrize("args, message", [
    (["train", "-c", "configs/demo.yaml", "train.epochz=3"], "unknown key 'train.epochz'"),
    (["train", "-c", "configs/demo.yaml", "train.epochs=-1"], "train.epochs"),
    (["train", "-c", "configs/nope.yaml"], "cannot read config configs/nope.yaml"),
    (["train", "-c", "configs/demo.yaml", "data.root=/nowhere"], "data.root: /nowhere has no train/ folder"),
    (["train", "-c", "configs/demo.yaml", "model.weights=/nowhere.pth", "model.head_from_imagenet=null"],
     "model.weights: file /nowhere.pth not found"),
    (["train", "-c", "configs/demo.yaml", "model.weights=none"], "model.head_from_imagenet: copies rows of the "
                                                                  "ImageNet classifier, so it needs model.weights"),
    (["label", "--checkpoint", "/nowhere", "--input", "data", "--output", "/tmp/x"], "checkpoint /nowhere not found"),
    (["label", "--checkpoint", "configs/demo.yaml", "--input", "/nowhere", "--output", "/tmp/x"],
     "input /nowhere not found"),
    (["label", "--checkpoint", "configs", "--input", "data", "--output", "/tmp/x", "--top-k", "0"], "--top-k 0"),
    (["label", "--checkpoint", "configs/demo.yaml", "--input", "jobs", "--output", "/tmp/x"],
     "nothing to label in jobs: no image"),
    (["label", "--checkpoint", "x", "--input", "y", "--output", "z", "--min-confidence", "2"], "--min-confidence 2"),
    (["label", "--checkpoint", "x", "--input", "y", "--output", "z", "--commit-every", "0"],
     "--commit-every 0.0: Input should be greater than 0"),
    (["label", "--checkpoint", "x", "--input", "y", "--output", "z", "--max-actors", "0"],
     "--max-actors 0: Input should be greater than or equal to 1"),
])
def test_mistakes_are_answered_before_torch_or_ray_load(args, message):
    """Exit 2 and one line, without importing torch, torchvision, timm or Ray (seconds of start-up on a small
    machine): that is what makes the answer instant. The time is printed, not asserted."""
    code, err, imported, seconds = run_cli(*args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert imported == [], imported
    print(f"{' '.join(args[:3])}: exit 2 in {seconds:.2f}s")


@pytest.mark.parametrize("command", ["train", "label"])
def test_help_answers_without_heavy_imports(command):
    code, err, imported, _ = run_cli(command, "--help")
    assert code == 0 and imported == []


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: carriage returns go back to the line's start and overwrite it."""
    lines, row, col = [""], 0, 0
    for char in text:
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1:]
            col += 1
    return [line.rstrip() for line in lines]


def test_console_redraws_on_a_terminal_and_writes_lines_in_a_log(tmp_path):
    class Terminal:  # what Console needs of a stream: write, flush, isatty
        def __init__(self, tty):
            self.text, self.tty = "", tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return self.tty

    term, log = Terminal(True), Terminal(False)
    for stream in (term, log):
        console = Console(stream)
        console.progress("step 1")
        console.progress("step 2")
        assert screen(term.text) == ["step 2"] or stream is log  # redrawn in place
        console.line("epoch done")
        assert screen(term.text) == ["epoch done", "step 2"] or stream is log  # lines go above the progress line
        console.progress("step 3")
        console.close()
    assert screen(term.text) == ["epoch done", "step 3", ""] and term.text.endswith("\n")
    assert log.text == "step 1\nepoch done\n"  # one progress line per few seconds in a log
    assert [duration(s) for s in (0, 65, 3725)] == ["0:00", "1:05", "1:02:05"]


def test_labeling_progress_redraws_in_place_on_a_real_terminal(ray_local, small_checkpoint, tmp_path):
    """On a pseudo-terminal the progress line is rewritten in place, with percent and ETA, then a summary line."""
    images = make_image_folder(tmp_path / "imgs", train_per_class=60, val_per_class=0)
    controller, terminal = pty.openpty()
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = start_label(["--checkpoint", small_checkpoint, "--input", str(images), "--output", str(tmp_path / "out"),
                        "--batch-size", "4"], env, stderr=subprocess.STDOUT, stdout=terminal)
    os.close(terminal)
    screen = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 300)
        try:
            chunk = os.read(controller, 65536) if ready else b""
        except OSError:  # the command ended and closed the terminal
            chunk = b""
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=60) == 0, screen.decode()[-2000:]
    text = screen.decode().replace("\x1b[0m", "")  # Ray resets the terminal's colours as it exits
    assert not NOISE.search(text), text[-2000:]
    assert re.search(r"\rlabel: \d+/120 \(\d+%\), [\d.]+ images/s, ETA \d+:\d\d, 0 errors", text), text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("label: 120 images: 120 labeled, 0 errors") and str(tmp_path / "out") in last, text[-1500:]
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["runs"][-1]["labeled"] == 120
