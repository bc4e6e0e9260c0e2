"""What of Ray's own output reaches a job's console, decided here and nowhere else.

Ray speaks through three routes: its Python loggers, the lines its C++ core writes to the driver's file descriptor 2,
and the workers' output, which it forwards to the driver's terminal. The jobs print their own progress and closing
lines (pipeline.console), so Ray's notices about the same things are noise; its warnings and errors pass. Each
private name used here is checked against Ray in tests/test_ray_internals.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading

from pipeline import ray_internals

# Ray's loggers whose lines repeat what the job says, by their names in Ray, with the least level that passes.
QUIET_LOGGERS = {
    ray_internals.TOKEN_SETUP_LOGGER: logging.ERROR,  # on every start or join: token auth is on (it is, and stays)
    "ray.data._internal.progress": logging.ERROR,  # about the progress bars the labeling job turns off
    "ray.data._internal.execution.streaming_executor": logging.WARNING,  # each execution's plan and end
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,  # imgjobs submit: every upload
    "ray.dashboard.modules.job.sdk": logging.WARNING,  # and every closed socket
    "ray._private.runtime_env.packaging": logging.ERROR,  # packing the working_dir: files our excludes leave out
    "ray._private.runtime_env.working_dir": logging.ERROR,  # and "now ignored by default"
}
# A line of Ray's C++ core, which no logger or option routes: it warns at every restartable actor whose arguments
# live in the object store, as the actors of Ray Data's pools and Ray Train's preemption watcher do. Their
# arguments live as long as the job that made them, so a restart finds them (tests/test_label_faults.py kills a
# predictor actor); the line stays in Ray's log files, and off the job's terminal.
RESTARTABLE_ACTOR_NOTICE = re.compile(
    r"core_worker\.cc.*has constructor arguments in the object store and max_restarts")


def quiet_driver() -> None:
    """Before a driver starts or joins Ray, or submits to it."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_worker() -> None:
    """In every worker process: Ray Train's INFO line per report (the job prints its own) stays in Ray's files."""
    ray_internals.train_report_logger().setLevel(logging.WARNING)


def drop_forwarded_notices() -> None:
    """After ray.init: the workers' RESTARTABLE_ACTOR_NOTICE lines stay in Ray's log files."""
    ray_internals.drop_forwarded_lines(RESTARTABLE_ACTOR_NOTICE)


@contextlib.contextmanager
def driver_notices_dropped():
    """Within the block, lines that this process writes to its standard error (file descriptor 2, so the C++
    core's too) pass on, except RESTARTABLE_ACTOR_NOTICE. Enter it after any child process that should keep the
    real standard error has started: children started inside inherit the filter."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as lines, os.fdopen(os.dup(saved), "wb", buffering=0) as out:
            for line in lines:
                if not RESTARTABLE_ACTOR_NOTICE.search(line.decode(errors="replace")):
                    out.write(line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to the end and stops
        os.close(saved)
        thread.join(timeout=10)
