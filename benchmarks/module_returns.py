"""How often the labeling job's flow returns to a pipeline module it had left: a measure of how far a reader must walk
back and forth between modules to follow the job.

    .venv/bin/python benchmarks/module_returns.py [--input data/hymenoptera/val]

It runs `imgjobs label` over the demo's val set with a random-weight checkpoint, on a local Ray of its own, with a
profiler (sys.setprofile and threading.setprofile) in every Python process of the job: the driver and each Ray
worker, which import this file through a sitecustomize.py placed on their PYTHONPATH. Each thread's flow is the
sequence of pipeline modules that run, one after another, as functions are called and return. A step from module A
to a module B that the thread had already run and left is a return. The figure is the number of distinct such steps
(A -> B), over every process: a loop over a million images walks the same steps as one over ten, so the figure
describes the code, not the data. Module-level code run at import is left out: imports run in import order, not in
the order the job's data flows. It also prints the modules the flow visits and the distinct steps between them, and
for each return the call or return that first made it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE_DIR = "IMGJOBS_MODULE_TRACE"  # set in the job's environment: where each process writes its steps


def install() -> None:
    """Trace this process's steps between pipeline modules into TRACE_DIR/<pid>.tsv: a line per distinct step,
    `A<TAB>B<TAB>1` where B had run in that thread before (a return), else 0. Called from sitecustomize."""
    root = str(REPO / "pipeline") + os.sep
    out = Path(os.environ[TRACE_DIR]) / f"{os.getpid()}.tsv"
    written: set[tuple[str, str, bool]] = set()
    lock = threading.Lock()
    local = threading.local()

    def module(code) -> str | None:
        name = code.co_filename
        return name[len(root):] if name.startswith(root) else None

    def profile(frame, event, _arg):
        if frame.f_code.co_name == "<module>" and module(frame.f_code) is not None:
            # An import runs module-level code in import order, not in the order the job's data flows: skip it.
            step = {"call": 1, "return": -1}.get(event, 0)
            local.importing = getattr(local, "importing", 0) + step
            return
        if getattr(local, "importing", 0):
            return
        if event == "call":
            now = module(frame.f_code)
        elif event == "return" and frame.f_back is not None:
            now = module(frame.f_back.f_code)  # back in the caller
        else:
            return
        before = getattr(local, "module", None)
        if now is None or now == before:
            return
        seen = local.__dict__.setdefault("seen", set())
        if before is not None:
            step = (before, now, now in seen)
            if step not in written:
                with lock:
                    written.add(step)
                    with out.open("a") as f:
                        f.write("\t".join([before, now, str(int(step[2])), event, frame.f_code.co_qualname]) + "\n")
        seen.add(now)
        local.module = now

    threading.setprofile(profile)
    sys.setprofile(profile)


def run_job(input_folder: Path, work: Path) -> Path:
    """`imgjobs label` over `input_folder`, traced; returns the folder of the processes' traces."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import fresh_env, random_weight_checkpoint

    traces, hook = work / "traces", work / "hook"
    for folder in (traces, hook, work / "ckpt"):
        folder.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get({TRACE_DIR!r}):\n"
        "    import module_returns\n"
        "    module_returns.install()\n")
    checkpoint = random_weight_checkpoint("mobilenet_v3_small", ["ants", "bees"], work / "ckpt", input_size=64)
    env = fresh_env() | {TRACE_DIR: str(traces),
                         "PYTHONPATH": os.pathsep.join([str(hook), str(REPO / "benchmarks"), str(REPO)])}
    subprocess.run([sys.executable, "-m", "jobs.cli", "label", "--checkpoint", checkpoint, "--input",
                    str(input_folder), "--output", str(work / "out")], cwd=REPO, env=env, check=True)
    return traces


def summarize(traces: Path) -> dict:
    steps: dict[tuple[str, str], bool] = {}
    via: dict[tuple[str, str], str] = {}
    processes = 0
    for trace in traces.glob("*.tsv"):
        processes += 1
        for line in trace.read_text().splitlines():
            before, now, back, event, func = line.split("\t")
            via.setdefault((before, now), f"{event} {func}")
            steps[(before, now)] = steps.get((before, now), False) or back == "1"
    modules = {m for step in steps for m in step}
    returns = sorted(step for step, back in steps.items() if back)
    return {"processes": processes, "modules": sorted(modules), "steps": len(steps), "returns": returns, "via": via}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=REPO / "data" / "hymenoptera" / "val")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = summarize(run_job(args.input.resolve(), Path(tmp)))
    print(f"\nprocesses traced with pipeline code: {found['processes']}")
    print(f"modules visited: {len(found['modules'])} ({', '.join(found['modules'])})")
    print(f"distinct steps between modules: {found['steps']}")
    print("returns (steps back to a module already left):")
    for before, now in found["returns"]:
        print(f"  {before} -> {now}  ({found['via'][(before, now)]})")
    print(f"RETURNS {len(found['returns'])}")


if __name__ == "__main__":
    main()
