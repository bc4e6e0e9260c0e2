"""One writer per output folder: an exclusive lock file with a heartbeat.

Taking the lock is an atomic create: a complete file hard-linked into place on local disks, a conditional PUT
(`If-None-Match: *`) on S3, through boto3 since pyarrow has none. Every later change (a heartbeat, a takeover, the
release) is a compare-and-swap against what the job last read: under flock on local disks, `If-Match` on the ETag
on S3. Of two jobs racing for the lock, exactly one wins. Stores without a conditional write (gs://, S3-compatible
servers that ignore the headers) fall back to writing and reading back after SETTLE_S, which two jobs starting
together can both pass.

Staleness never compares clocks across hosts. The holder bumps a counter in the lock every lease/36 seconds (5 s at
the default lease of 180 s). A job that finds the lock watches it on its own monotonic clock: it is refused once the
lock changes, within seconds, and takes it over once it has not changed for a whole lease. On the holder's own
host, boot and PID namespace, a lock whose process is gone (a kill -9) is taken over at once. The holder commits only
while its own monotonic clock shows its last successful heartbeat younger than the lease less a margin (30 s at the
default lease): a holder paused past that (SIGSTOP, a VM stall) may have been taken over, so it stops instead, and
never renews the lock again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError

LOCK = "_lock.json"
LEASE_S = 180.0
LEASE_ENV = "IMGJOBS_LOCK_LEASE_S"  # tests shorten the lease with it
MARGIN_S = 30.0  # a commit, started while the lease holds, has this long to land before a waiting job may take over
SETTLE_S = 0.5  # stores without conditional writes: between writing the lock and reading it back


@dataclass(frozen=True)
class Folder:
    """An output folder: as the user named it (`uri`, for messages), and its filesystem and path there."""

    uri: str
    fs: pafs.FileSystem
    path: str


class OutputBusy(UsageError):
    """Another job writes into the same output."""


class OutputLock:
    """The lock of the output `folder`, for the run `run_id`. `lease_s` (default IMGJOBS_LOCK_LEASE_S, else 180) and
    `clock` (monotonic) are for tests."""

    def __init__(self, folder: Folder, run_id: str, log=print, lease_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.output, self.log, self.clock = folder.uri, log, clock
        self.lease = lease_s or lease_from_env()
        self.margin = min(MARGIN_S, self.lease / 6)
        self.heartbeat_s = self.lease / 36  # a job refused waits about this long to see the lock move
        self.store = open_store(folder, log)
        self.holder = {"run_id": run_id, **identity(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "lease_s": self.lease, "beat": 0}
        self.token = None  # what the store answered to this run's last write: the lock's ETag, or its content
        self.last_beat: float | None = None  # clock() when this run's last successful write of the lock began
        self.lost: dict | None = None  # the lock's holder, once another job took it
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise OutputBusy naming its live holder."""
        seen = None  # the lock's token when this job first read it, and when (its own clock)
        while True:
            found = self.store.read()
            if found is None:
                if self._write(self.store.create):
                    break
                continue  # another job created it in between: watch that one
            holder, token = parse(found[0]), found[1]
            if seen and seen[1] != token:
                raise OutputBusy(f"output {self.output} is being written by {describe(holder)}, whose heartbeat "
                                 "goes on; wait for it to finish, or use another --output")
            lease = max(self.lease, _number(holder.get("lease_s")))  # the holder's own, if longer
            gone = gone_here(holder)
            if seen is None:
                seen = (self.clock(), token)
                if not gone:
                    self.log(f"label: output {self.output} is locked by {describe(holder)}; watching its heartbeat "
                             f"for up to {lease:.0f}s to tell whether it still runs")
            waited = self.clock() - seen[0]
            reason = gone or (waited >= lease and f"no heartbeat for {waited:.0f}s")
            if reason:
                if self._write(lambda data: self.store.replace(data, token)):
                    self.log(f"label: taking over the lock of {describe(holder)}: {reason}")
                    break
                continue  # another job changed it first: the next read sees that job
            time.sleep(self.heartbeat_s / 3)
        self._beating = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._beating.start()

    def check(self) -> None:
        """Raise OutputBusy unless this run may commit: its last heartbeat is recent enough, on its own clock, that no
        other job can have taken the lock over, and its heartbeat has not found the lock taken."""
        if not self._fresh():
            age = self.clock() - self.last_beat
            raise OutputBusy(f"output {self.output}: this run last renewed its lock {age:.0f}s ago, too close to its "
                             f"{self.lease:.0f}s lease (the process was paused, or the storage failed), so another job "
                             "may hold it now; this run stops without committing more, and running the same command "
                             "again resumes")
        if self.lost is not None:
            raise OutputBusy(f"output {self.output} was taken over by {describe(self.lost)} while this run wrote "
                             "to it; this run stops, and the files it committed stay")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock while it is still this run's. A lock past its lease may be another
        job's by now: it stays, for the next job to take over."""
        self._stop.set()
        if self._beating:
            self._beating.join()
        if self.lost is None and self._fresh():
            try:
                self.store.delete(self.token)
            except OSError:
                pass  # left behind: the next job takes it over, at once on this host, else after a lease

    def _fresh(self) -> bool:
        return self.last_beat is not None and self.clock() - self.last_beat <= self.lease - self.margin

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._fresh():
                return  # paused past its lease: it may be another job's lock now, so never renew it
            try:
                if not self._write(lambda data: self.store.replace(data, self.token)):
                    found = self.store.read()
                    self.lost = parse(found[0]) if found else {}
                    return
            except OSError:
                pass  # a storage hiccup: the next beat tries again, and check() stops commits once the lease runs low

    def _write(self, change: Callable[[bytes], object]) -> bool:
        """Write the lock with this run's next beat through `change` (a create or a compare-and-swap, which returns
        the new token, or None when refused). True once the lock is this run's: a write whose answer was lost may
        have landed, and the lock then holds exactly what this run wrote."""
        began = self.clock()
        self.holder["beat"] += 1
        data = json.dumps(self.holder).encode()
        token = change(data)
        if token is None:
            found = self.store.read()
            token = found[1] if found and found[0] == data else None
        if token is None:
            return False
        self.token, self.last_beat = token, began
        return True


def lease_from_env() -> float:
    text = os.environ.get(LEASE_ENV)
    if text is None:
        return LEASE_S
    lease = _number(text)
    if not (math.isfinite(lease) and lease > 0):
        raise UsageError(f"{LEASE_ENV}={text!r} is not a number of seconds above 0; unset it for the default "
                         f"{LEASE_S:.0f}")
    return lease


def identity() -> dict:
    """What tells this process apart: its pid means something only within its PID namespace, on this boot."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace()}


def gone_here(holder: dict) -> str | None:
    """Why `holder` holds nothing any more, when that is certain without a lease: it ran in this PID namespace on this
    boot of this host, and its process is gone. Anywhere else, another container included, its heartbeat tells."""
    mine, pid = identity(), holder.get("pid")
    if any(holder.get(key) != mine[key] for key in ("host", "boot_id", "pid_ns")) or _alive(pid):
        return None
    return f"its process {pid} is gone"


def describe(holder: dict) -> str:
    return f"label run {holder.get('run_id') or '?'} (host {holder.get('host') or '?'}, pid {holder.get('pid') or '?'})"


def parse(data: bytes) -> dict:
    """The lock's holder; {} for a lock nobody can be identified from (written by hand, or cut short), which its
    heartbeat alone judges."""
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[INODE]"
    except OSError:
        return ""


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # no pid to look for: only the heartbeat can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def open_store(folder: Folder, log) -> LocalStore | S3Store | ReadBackStore:
    """The lock file of `folder`, with the strongest writes that store offers."""
    fs, path = folder.fs, f"{folder.path}/{LOCK}"
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalStore(path)
    if isinstance(fs, pafs.S3FileSystem):
        store = S3Store(fs, path)
        if store.conditional_writes():
            return store
    log(f"label: {folder.uri} takes no conditional writes, so the lock is written and read back: two jobs started "
        "within a second of each other could both take it (docs/guarantees.md)")
    return ReadBackStore(fs, path)


# The stores: read() gives (content, token) or None; create(data) and replace(data, token) give the new token, or None
# where the lock exists already or its token is no longer `token`; delete(token) deletes it only while it is `token`.


class LocalStore:
    """A lock file on a local disk (or NFS, as far as its flock goes). Its content is its token. Every change puts a
    new file in its place or deletes it, so readers need no lock, and a job that waited for the flock of a file
    replaced meanwhile sees that."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bytes | None:
        temp = self._complete(data)
        try:
            os.link(temp, self.path)  # atomic, and refused where the lock exists
        except FileExistsError:
            return None
        finally:
            os.unlink(temp)
        return data

    def replace(self, data: bytes, token: bytes) -> bytes | None:
        temp = self._complete(data)
        try:
            return data if self._change(token, lambda: os.rename(temp, self.path)) else None
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed into place when it replaced the lock
                os.unlink(temp)

    def delete(self, token: bytes) -> None:
        self._change(token, lambda: os.unlink(self.path))

    def _complete(self, data: bytes) -> str:
        """A file beside the lock holding `data`, so that the lock is never seen half written."""
        temp = f"{self.path}.{uuid.uuid4().hex}"  # starts with "_", as the lock does: no reader takes it for labels
        with open(temp, "wb") as f:
            f.write(data)
        return temp

    def _change(self, token: bytes, change: Callable[[], None]) -> bool:
        """change() under an exclusive flock of the lock file, if the file at its path is still `token`."""
        try:
            f = open(self.path, "r+b")  # for writing: NFS grants exclusive flocks only on such files
        except FileNotFoundError:
            return False
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(f.fileno()))
            except FileNotFoundError:
                same = False
            if not same or f.read() != token:
                return False
            change()
        return True


class S3Store:
    """The lock as an S3 object: created with If-None-Match: *, changed and deleted with If-Match on its ETag. The
    boto3 client goes where the pyarrow filesystem goes."""

    REFUSED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")

    def __init__(self, fs: pafs.S3FileSystem, path: str):
        import boto3  # only for S3 outputs: its import takes a fraction of a second
        from botocore.config import Config

        # The options pyarrow resolved from the URI's query and AWS_ENDPOINT_URL: those it pickles the filesystem with.
        options = fs.__reduce__()[1][0]
        endpoint = options["endpoint_override"] or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{options['scheme']}://{endpoint}"
        # pyarrow addresses buckets by path at a custom endpoint unless told otherwise, by host on AWS itself.
        virtual = not endpoint or options.get("force_virtual_addressing")  # absent in older pyarrow
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=options["region"] or None,
            aws_access_key_id=options["access_key"], aws_secret_access_key=options["secret_key"],
            aws_session_token=options["session_token"],
            # No checksums pyarrow does not send either: older S3-compatible servers refuse them.
            config=Config(s3={"addressing_style": "virtual" if virtual else "path"},
                          request_checksum_calculation="when_required", response_checksum_validation="when_required"))
        self.bucket, _, self.key = path.partition("/")

    def conditional_writes(self) -> bool:
        """Whether the server honours If-None-Match and If-Match on PUT: some S3-compatible servers ignore them."""
        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        try:
            if self._put(probe, b"", IfNoneMatch="*") is None:
                return False
            honoured = (self._put(probe, b"", IfNoneMatch="*") is None
                        and self._put(probe, b"", IfMatch='"not-its-etag"') is None)
            self._call(self.client.delete_object, Bucket=self.bucket, Key=probe)
        except OSError as e:
            if "NotImplemented" in str(e):
                return False
            raise
        return honoured

    def read(self) -> tuple[bytes, str] | None:
        try:
            answer = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        return answer["Body"].read(), answer["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(self.key, data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str | None:
        return self._put(self.key, data, IfMatch=token)

    def delete(self, token: str) -> None:
        try:
            self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key, IfMatch=token)
        except FileNotFoundError:
            pass

    def _put(self, key: str, data: bytes, **condition) -> str | None:
        try:
            return self._call(self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **condition)["ETag"]
        except FileNotFoundError:  # refused: the condition did not hold
            return None

    def _call(self, method, **kwargs) -> dict:
        """method(**kwargs), with a refused condition or a missing key as FileNotFoundError and any other failure as
        OSError, as pyarrow raises them."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in self.REFUSED:
                raise FileNotFoundError(code) from None
            raise OSError(f"s3://{self.bucket}/{kwargs['Key']}: {code}: {e}") from None
        except BotoCoreError as e:
            raise OSError(f"s3://{self.bucket}/{kwargs['Key']}: {e}") from None


class ReadBackStore:
    """Any other store: write, wait SETTLE_S, read back. A job that writes just after another read its own back takes
    the lock too: docs/guarantees.md says what holds there."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = storage.read_bytes(self.fs, self.path)
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bytes | None:
        return None if self.read() else self._write(data)

    def replace(self, data: bytes, token: bytes) -> bytes | None:
        found = self.read()
        return self._write(data) if found and found[1] == token else None

    def delete(self, token: bytes) -> None:
        found = self.read()
        if found and found[1] == token:
            self.fs.delete_file(self.path)

    def _write(self, data: bytes) -> bytes | None:
        storage.write_bytes(self.fs, self.path, data)
        time.sleep(SETTLE_S)
        found = self.read()
        return data if found and found[1] == data else None
