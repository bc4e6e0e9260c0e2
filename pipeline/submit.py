"""Running imgjobs commands on a Ray cluster through the Jobs API: the code package, the address and the token."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ray.job_submission import JobInfo, JobStatus, JobSubmissionClient

from pipeline import ray_internals
from pipeline.cluster import storage_environment
from pipeline.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a job carries to the cluster: the code and the configs, nothing else (no data, runs, labels, checkpoints,
# caches, .git or .venv). Dependencies are installed on the nodes (cluster.yaml setup_commands).
PACKAGE_CONTENT = ("pyproject.toml", "jobs", "pipeline", "configs")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray's client lets these override the address it is given; `--address` must win.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_HELP = ("the cluster's token (`ray get-auth-token` on the head prints it) belongs in ~/.ray/auth_token, "
              "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH; it goes to addresses other than 127.0.0.1 "
              "only with RAY_AUTH_MODE=token")


def package_files() -> list[str]:
    """Project-relative POSIX paths of the files a job carries."""
    files = []
    for entry in PACKAGE_CONTENT:
        path = PROJECT_ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p.relative_to(PROJECT_ROOT).as_posix() for p in candidates
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")]
    return files


def check_links(root: Path = PROJECT_ROOT) -> None:
    """Refuse a symlink among the job's files that points outside them: Ray packs the working_dir following links,
    so it would upload what the link points at (a key, ~/.aws/credentials, a dataset) under the link's name."""
    root = root.resolve()
    carried = [root / entry for entry in PACKAGE_CONTENT]
    for link in _links(carried):
        target = link.resolve()
        inside = any(target.is_relative_to(base) and not any(map(_left_out, target.relative_to(base).parts))
                     for base in carried)
        if link.exists() and not inside:  # a broken link uploads nothing
            raise UsageError(f"{link.relative_to(root)} links to {target}, outside the files a job carries "
                             f"({', '.join(PACKAGE_CONTENT)}), and imgjobs submit would upload it: copy what the job "
                             "needs into the project, or remove the link")


def _links(paths) -> Iterator[Path]:
    """The symlinks among `paths` and in the folders below them, as Ray's packing meets them."""
    for path in paths:
        if path.is_symlink():
            yield path
        elif path.is_dir():
            yield from _links(p for p in path.iterdir() if not _left_out(p.name))


def _left_out(name: str) -> bool:
    """Names that runtime_env's excludes leave out wherever they are."""
    return name == "__pycache__" or name.startswith(".")


def runtime_env() -> dict:
    """The project as the job's working_dir, less everything but PACKAGE_CONTENT (gitignore-style excludes that
    leave the same files as package_files). Ray zips it, names it by a hash of its content and uploads it only
    when that hash is new to the cluster. An S3 endpoint set in this shell goes with the job."""
    others = sorted(name for name in os.listdir(PROJECT_ROOT) if name not in PACKAGE_CONTENT)
    excludes = [*(f"/{name}" for name in others), "__pycache__", ".[!.]*"]  # not ".*": it matches the root, "."
    return {"working_dir": str(PROJECT_ROOT), "excludes": excludes, "env_vars": storage_environment()}


def resolve_address(flag: str | None) -> str:
    return flag or next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), DEFAULT_ADDRESS)


def auth_headers(address: str) -> dict:
    """The cluster token from wherever Ray keeps it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).

    `ray start --head` and ray.init() turn token authentication on whenever a token exists, but Ray's job client
    sends the token only when RAY_AUTH_MODE=token is set on the client; without it a default local cluster answers
    "Unauthorized: Missing authentication token". So the token goes by default to this machine's dashboards: a
    local cluster, or a remote one through `ray dashboard cluster.yaml`'s tunnel. Elsewhere, as for Ray's own
    clients, only with RAY_AUTH_MODE=token; and never with RAY_AUTH_MODE=disabled.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled" or (mode != "token" and not is_loopback(address)):
        return {}
    return ray_internals.token_header()


def is_loopback(address: str) -> bool:
    """Whether an address (URL or host:port) is this machine's loopback."""
    host = urlsplit(address if "://" in address else f"//{address}").hostname
    if host == "localhost" or address == "auto":  # auto: a cluster of this machine
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or no host at all
        return False


def connect(address: str) -> JobSubmissionClient:
    hidden = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        return JobSubmissionClient(address, headers=auth_headers(address))
    finally:
        os.environ.update(hidden)


def entrypoint(job_argv: list[str]) -> str:
    """The same CLI on the cluster, run from the uploaded package (the job's working directory), so the code that
    runs is the code submitted, whatever version setup_commands installed on the nodes."""
    return shlex.join(["python", "-m", "jobs.cli", *job_argv])


def submit(client: JobSubmissionClient, job_argv: list[str]) -> str:
    return client.submit_job(entrypoint=entrypoint(job_argv), runtime_env=runtime_env(),
                             metadata={"imgjobs": shlex.join(job_argv)})


def follow(client: JobSubmissionClient, job_id: str, write) -> tuple[JobInfo, str]:
    """Stream the job's logs to write() until it ends; return its final info and its last log line (the error,
    when it failed)."""
    last_line = ""

    async def tail():
        nonlocal last_line
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            last_line = next((line for line in reversed(chunk.splitlines()) if line.strip()), last_line)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info, last_line


def exit_code(info: JobInfo) -> int:
    """0 when the job succeeded; else the driver's own exit code (2 for a usage error), or 1."""
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code if info.driver_exit_code and info.driver_exit_code > 0 else 1
