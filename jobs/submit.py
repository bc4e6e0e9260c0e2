"""`imgjobs submit [--address URL] [--no-wait] -- train|label|audit|report ...`: run a job on a Ray cluster via the
Jobs API.

Prints the job id, streams the job's logs and exits with the job's status (0 when it succeeded).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ray.exceptions import AuthenticationError

from jobs.cli import COMMANDS
from pipeline import ray_output, storage, submit
from pipeline.errors import UsageError
from pipeline.train.config import load_config

USAGE = "name the job after --, e.g. imgjobs submit -- train -c configs/train.yaml [key=value ...]"


def add_arguments(parser) -> None:
    parser.add_argument("--address", help=f"Ray dashboard URL (default: $RAY_ADDRESS, else {submit.DEFAULT_ADDRESS})")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    parser.add_argument("job", nargs=argparse.REMAINDER, metavar="-- JOB ...",
                        help="train ..., label ..., audit ... or report ...")


def run(args) -> int:
    ray_output.quiet_driver()
    job_argv = args.job[1:] if args.job[:1] == ["--"] else args.job
    check_job(job_argv)
    address = submit.resolve_address(args.address)
    files = submit.package_files()
    size = sum((submit.PROJECT_ROOT / name).stat().st_size for name in files)
    print(f"working_dir: {len(files)} files, {size / 1024:.1f} KiB ({', '.join(submit.PACKAGE_CONTENT)})")
    try:
        client = submit.connect(address)
        job_id = submit.submit(client, job_argv)
    except ConnectionError:
        raise UsageError(f"no Ray dashboard answers at {address}; start a cluster (ray start --head, "
                         "ray up cluster.yaml) or pass --address / set RAY_ADDRESS") from None
    except AuthenticationError as e:
        raise UsageError(f"Ray at {address} refused the request ({str(e).splitlines()[0]}); "
                         f"{submit.TOKEN_HELP}") from None
    print(f"job {job_id} submitted to {address}", flush=True)
    if args.no_wait:
        # Ray's own CLI sends the token only when told to.
        auth = "RAY_AUTH_MODE=token " if submit.auth_headers(address) else ""
        print(f"follow it with: {auth}ray job logs --follow {job_id} --address {address}")
        print(job_id)
        return 0
    try:
        info, last_line = submit.follow(client, job_id, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        print(f"\nimgjobs submit: stopped following; job {job_id} keeps running (ray job stop {job_id} ends it)",
              file=sys.stderr)
        return 130
    code = submit.exit_code(info)
    if code == 0:
        print(f"job {job_id} SUCCEEDED")
    else:
        # A job that ran ends its logs with its error; one that never started (runtime_env setup) has a message.
        error = last_line if info.driver_exit_code and last_line else (info.message or "").strip().split("\n")[0]
        print(f"imgjobs submit: job {job_id} {info.status} (exit code {code}): {error}", file=sys.stderr)
    return code


def check_job(job_argv: list[str]) -> None:
    """Catch argument and config mistakes here, before anything is uploaded: the job's own parser reads its
    arguments, a config file must be one that travels with the job, and no URI may carry credentials nor any link
    a file from outside (check_links)."""
    runnable = [name for name in COMMANDS if name != "submit"]
    if not job_argv or job_argv[0] not in runnable:
        raise UsageError(f"{USAGE}; jobs: {', '.join(runnable)}")
    name, *rest = job_argv
    for argument in rest:  # they become the job's entrypoint and metadata, which anyone with the dashboard reads
        storage.refuse_credentials(argument, "argument")
    submit.check_links()
    parser = argparse.ArgumentParser(prog=f"imgjobs submit -- {name}")
    importlib.import_module(f"jobs.{name}").add_arguments(parser)
    parsed = parser.parse_args(rest)
    config = getattr(parsed, "config", None)
    if config is not None:
        if os.path.normpath(config) not in submit.package_files():
            raise UsageError(f"config {config} does not travel with the job: give a file under configs/, relative "
                             "to the project root (the job's working directory), e.g. -c configs/train.yaml")
        load_config(str(submit.PROJECT_ROOT / config), getattr(parsed, "overrides", []))
