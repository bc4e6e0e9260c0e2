"""The output folder's lock, its closing and --overwrite, on local disk and on a real S3 API server: jobs racing for the
lock, holders killed or paused (SIGSTOP) in processes of their own, locks of other PID namespaces and boots."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.labels_file import part_paths, read_table
from pipeline.label.lock import LEASE_ENV, LOCK, Folder, OutputBusy, OutputLock, ReadBackStore, identity
from pipeline.label.output import SUMMARY, TEMP_PREFIX, CommitPolicy, LabelWriter
from tests.helpers import REPO, Clock
from tests.test_label_output import PROVENANCE, rows

# A label job's writer in a process of its own: it commits "before", says its run id, and on a line from stdin commits
# "after" and closes, as `imgjobs label` does; a UsageError is its one line on stderr and exit 2.
HOLDER = """
import sys

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.label.output import CommitPolicy, LabelWriter
from pipeline.label.units import UNIT, UNIT_TOTAL
from pipeline.formats.labels_file import OUTPUT_SCHEMA, Decoding, Provenance

PROVENANCE = Provenance("0", "c.pt", "0" * 64, "resnet18", ["a", "b"], "auto", Decoding(exact=False), 2, 0.0, None,
                        "fp32", "cpu")


def row(name):  # one input, a unit of its own
    schema = OUTPUT_SCHEMA.append(pa.field(UNIT, pa.string())).append(pa.field(UNIT_TOTAL, pa.int64()))
    return pa.Table.from_pylist([{"path": name, UNIT: name, UNIT_TOTAL: 1}], schema=schema)


writer = LabelWriter(sys.argv[1], PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=False)
writer.add(row("before"))
print(writer.run_id, flush=True)
sys.stdin.readline()
try:
    try:
        writer.add(row("after"))
    finally:
        writer.close()
except UsageError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(filesystem, path in it, the output as a user names it): a fresh output folder on each storage."""
    if request.param == "local":
        uri = str(tmp_path / "out")
    else:
        uri = request.getfixturevalue("s3_server").uri(f"labels/{uuid.uuid4().hex[:8]}")
    fs, base = storage.resolve(uri)
    fs.create_dir(base, recursive=True)
    return fs, base, uri


@pytest.fixture
def start_holder():
    """start(output, lease_s): HOLDER running into `output` with that lease, once it holds the lock and has committed a
    file: (its process, its run id). Processes still running at the end are killed."""
    started = []

    def start(uri: str, lease_s: float) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], cwd=REPO,
                                env={**os.environ, LEASE_ENV: str(lease_s)}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.communicate()[1]
        return proc, run_id

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def labels(fs: pafs.FileSystem, base: str) -> list[str]:
    return sorted(path for part in part_paths(fs, base) for path in read_table(fs, part, ["path"])["path"].to_pylist())


def names(fs: pafs.FileSystem, base: str) -> list[str]:
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)))


def holder_of(fs: pafs.FileSystem, base: str) -> str:
    return json.loads(storage.read_bytes(fs, f"{base}/{LOCK}"))["run_id"]


def test_of_jobs_racing_for_one_output_exactly_one_takes_the_lock(output):
    """Six jobs start at once: one takes the lock with an atomic create, and the others, once they see its heartbeat
    move, are refused naming it."""
    fs, base, uri = output
    said = []
    locks = [OutputLock(Folder(uri, fs, base), f"run-{i}", log=said.append, lease_s=6) for i in range(6)]
    assert not any(isinstance(lock.store, ReadBackStore) for lock in locks)  # both stores write conditionally
    start, outcomes = threading.Barrier(len(locks)), {}

    def race(lock: OutputLock) -> None:
        start.wait()
        try:
            lock.acquire()
            outcomes[lock.holder["run_id"]] = "took it"
        except OutputBusy as e:
            outcomes[lock.holder["run_id"]] = str(e)

    threads = [threading.Thread(target=race, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [run for run, outcome in outcomes.items() if outcome == "took it"]
    assert len(winners) == 1, outcomes
    assert holder_of(fs, base) == winners[0]
    refused = f"output {uri} is being written by label run {winners[0]} "
    assert all(run == winners[0] or outcome.startswith(refused) for run, outcome in outcomes.items()), outcomes
    assert not [line for line in said if "taking over" in line or "conditional" in line], said
    # However late a racer comes, a lock that exists refuses its create: one that read no lock before the winner
    # wrote it, and creates now.
    assert locks[0].store.create(b"late") is None and holder_of(fs, base) == winners[0]
    locks[int(winners[0].split("-")[1])].release()
    assert names(fs, base) == []


def pause(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` at a moment it holds no flock: its heartbeat renews a local lock under one, which a stopped
    holder would keep, and the takeover would wait for it."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        if f" {proc.pid} " not in Path("/proc/locks").read_text():
            return
        proc.send_signal(signal.SIGCONT)


def test_a_holder_paused_past_its_lease_commits_nothing_after_another_job_took_over(output, start_holder, monkeypatch):
    """A job stopped (SIGSTOP) for longer than its 5 s lease is taken over by the next one, which waits that lease on
    its own clock. Resumed, the stopped job finds its last heartbeat too old: it commits nothing, says so in one line,
    and leaves the new holder's lock alone."""
    fs, base, uri = output
    proc, stopped_run = start_holder(uri, lease_s=5)
    pause(proc)
    monkeypatch.setenv(LEASE_ENV, "5")
    said = []
    taker = LabelWriter(uri, PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=False,
                        log=said.append)
    took_over = re.fullmatch(rf"label: taking over the lock of label run {stopped_run} \(host .+, pid {proc.pid}\): "
                             r"no heartbeat for (\d+)s", said[-1])
    assert took_over and int(took_over[1]) >= 5, said

    proc.send_signal(signal.SIGCONT)
    err = proc.communicate("commit\n", timeout=60)[1]
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert re.match(rf"output {re.escape(uri)}: this run last renewed its lock \d+s ago, too close to its 5s lease "
                    r"\(the process was paused, or the storage failed\)", err), err
    assert holder_of(fs, base) == taker.run_id
    taker.add(rows("taken", unit="taken", total=1))
    taker.close()
    assert labels(fs, base) == ["before", "taken"]  # nothing of the paused job after the takeover
    assert LOCK not in names(fs, base)


def test_a_holder_commits_only_while_its_last_heartbeat_is_younger_than_the_lease_less_30_s(tmp_path, monkeypatch):
    """The holder's own monotonic clock decides, at the default lease of 180 s: it commits 150 s after its last
    heartbeat, and not a second later. A lock past its lease may be another job's: the holder leaves it."""
    monkeypatch.delenv(LEASE_ENV, raising=False)
    clock, out = Clock(), tmp_path / "out"
    out.mkdir()
    lock = OutputLock(Folder(str(out), pafs.LocalFileSystem(), str(out)), "run", clock=clock)
    lock.acquire()
    clock.now += 150
    lock.check()
    clock.now += 1
    with pytest.raises(OutputBusy, match=r"this run last renewed its lock 151s ago, too close to its 180s lease"):
        lock.check()
    lock.release()
    assert (out / LOCK).exists()


@pytest.mark.timeout(60)  # the lease is 10 minutes: a job that waited for it fails here
def test_a_lock_whose_process_is_gone_from_this_host_is_taken_over_at_once(output, start_holder):
    fs, base, uri = output
    proc, killed_run = start_holder(uri, lease_s=600)
    proc.kill()
    proc.wait()
    said = []
    lock = OutputLock(Folder(uri, fs, base), "next", log=said.append, lease_s=600)
    lock.acquire()
    assert said == [f"label: taking over the lock of label run {killed_run} (host {socket.gethostname()}, pid "
                    f"{proc.pid}): its process {proc.pid} is gone"]
    lock.release()


@pytest.mark.parametrize("elsewhere", ["pid_ns", "boot_id"])
def test_a_lock_from_another_pid_namespace_or_boot_is_judged_by_its_heartbeat_not_its_pid(tmp_path, elsewhere):
    """A container on this host, or this host before a reboot, numbers its processes apart: a pid that is gone here
    says nothing of its holder, which is taken over only once its heartbeat has stood still for a lease."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    holder = {**identity(), elsewhere: "elsewhere", "pid": gone.pid, "run_id": "contained", "lease_s": 1.5, "beat": 1}
    (out / LOCK).write_text(json.dumps(holder))
    said = []
    lock = OutputLock(Folder(str(out), pafs.LocalFileSystem(), str(out)), "next", log=said.append, lease_s=1.5)
    lock.acquire()
    described = f"label run contained (host {socket.gethostname()}, pid {gone.pid})"
    assert said[0] == (f"label: output {out} is locked by {described}; watching its heartbeat for up to 2s to tell "
                       "whether it still runs")
    assert re.fullmatch(rf"label: taking over the lock of {re.escape(described)}: no heartbeat for \d+s", said[1]), said
    lock.release()


def test_the_lock_is_given_back_when_the_last_commit_fails(tmp_path):
    out = tmp_path / "out"
    writer = LabelWriter(str(out), PROVENANCE, CommitPolicy(rows_per_file=100, every_s=3600), overwrite=False)
    writer.add(rows("a"))
    (out / f"{TEMP_PREFIX}part-{writer.run_id}-00000.parquet").mkdir()  # a folder where the last file goes
    with pytest.raises(UsageError, match=r"writing .+ failed: .+; 0 file\(s\) of this run are complete"):
        writer.close()
    assert not (out / LOCK).exists()


def test_the_summary_and_the_page_are_written_before_the_lock_is_given_back(ray_local, small_checkpoint, tiny_folder,
                                                                            tmp_path, monkeypatch):
    """The next job into the output, which may start the moment the lock goes, finds this run's summary and page."""
    out, seen = tmp_path / "out", []
    release = OutputLock.release

    def release_seen(lock: OutputLock) -> None:
        seen.append({p.name for p in out.iterdir()})
        release(lock)

    monkeypatch.setattr(OutputLock, "release", release_seen)
    assert main(["label", "--checkpoint", small_checkpoint, "--input", str(tiny_folder / "val"), "--output", str(out),
                 "--report"]) == 0
    assert len(seen) == 1 and {LOCK, "_report.html", SUMMARY} <= seen[0], seen
    assert not (out / LOCK).exists()


def test_overwrite_deletes_only_files_that_carry_imgjobs_provenance(output):
    """A Parquet file someone else put in the output is never deleted: --overwrite refuses in one line, before
    deleting anything, and starts over once that file is moved out."""
    fs, base, uri = output
    earlier = LabelWriter(uri, PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=False)
    earlier.add(rows("a", unit="a", total=1))
    earlier.close()
    storage.write_bytes(fs, f"{base}/{SUMMARY}", b'{"runs": []}')
    pq.write_table(pa.table({"id": [1, 2]}), f"{base}/theirs.parquet", filesystem=fs)
    held = names(fs, base)
    assert len(held) == 3

    with pytest.raises(UsageError) as refused:
        LabelWriter(uri, PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=True)
    assert str(refused.value) == (f"output {uri} holds theirs.parquet, which carries no imgjobs provenance; imgjobs "
                                  "never deletes such a file, --overwrite included: move it out of the folder, or use "
                                  "another --output")
    assert names(fs, base) == held  # nothing deleted, and the lock given back

    fs.move(f"{base}/theirs.parquet", f"{base}-theirs.parquet")
    LabelWriter(uri, PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=True).close()
    assert names(fs, base) == []
    assert pq.read_table(f"{base}-theirs.parquet", filesystem=fs).num_rows == 2


def test_without_conditional_writes_the_lock_is_written_and_read_back(tmp_path):
    """A store without conditional writes (here local disk behind a pyarrow SubTreeFileSystem, which the lock reaches
    as it reaches gs://) keeps the lock by writing and reading back, and says so. A holder past its lease renews it no
    more, so the next job takes it over after a lease, and the holder leaves that job's lock alone."""
    fs, said, clock = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), [], Clock()
    fs.create_dir("out")
    paused = OutputLock(Folder("OUT", fs, "out"), "paused", log=said.append, lease_s=2, clock=clock)
    assert said == ["label: OUT takes no conditional writes, so the lock is written and read back: two jobs started "
                    "within a second of each other could both take it (docs/guarantees.md)"]
    paused.acquire()
    clock.now += 2  # the lease has run out on its clock, as after a pause
    paused._beating.join(timeout=30)
    assert not paused._beating.is_alive()  # its heartbeat stopped by itself
    taker = OutputLock(Folder("OUT", fs, "out"), "taker", log=said.append, lease_s=2)
    taker.acquire()
    assert re.fullmatch(r"label: taking over the lock of label run paused \(.+\): no heartbeat for \d+s", said[-1])
    paused.release()
    assert holder_of(fs, "out") == "taker"
    taker.release()
    assert names(fs, "out") == []


def test_a_lease_that_is_no_number_of_seconds_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "3m")
    with pytest.raises(UsageError, match=rf"^{LEASE_ENV}='3m' is not a number of seconds above 0; unset it for the "
                                         "default 180$"):
        LabelWriter(str(tmp_path / "out"), PROVENANCE, CommitPolicy(1, 3600), overwrite=False)
