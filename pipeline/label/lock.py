"""One writer per output folder: a lock file with a heartbeat, on local disk and on object stores alike.

Object stores have no atomic create-if-absent through pyarrow, so the lock is a plain file the holder rewrites
every HEARTBEAT_S seconds, and whoever writes it last holds it: a job that takes the lock reads it back after
a pause, and backs off if another took it in between. A lock counts as stale when its heartbeat is
older than STALE_AFTER_S, or at once when its holder ran on this host and its process is gone (a kill -9).
The holder checks, at every beat, that the file still names it; a job that lost its lock stops before its
next commit.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError

LOCK = "_lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
SETTLE_S = 0.5  # between writing a lock and reading it back, for a job racing another to it


class OutputBusy(UsageError):
    """Another job writes into the same output."""


class OutputLock:
    def __init__(self, fs: pafs.FileSystem, base: str, run_id: str, output: str):
        self.fs, self.path, self.output = fs, f"{base}/{LOCK}", output
        self.holder = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.lost: dict | None = None  # the lock's holder, once another job took it
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise OutputBusy naming its live holder. Returns a line to print when it took
        over a stale lock."""
        current = self._read()
        note = None
        if current:
            stale = why_stale(current)
            if not stale:
                raise OutputBusy(f"output {self.output} is being written by {describe(current)}, last heartbeat "
                                 f"{time.time() - current['heartbeat']:.0f}s ago; wait for it to finish, or use "
                                 f"another --output (a lock with no heartbeat for {STALE_AFTER_S:.0f}s is taken over)")
            note = f"label: taking over the lock of {describe(current)}: {stale}"
        self._write()
        time.sleep(SETTLE_S)
        current = self._read()
        if not current or current["run_id"] != self.holder["run_id"]:
            raise OutputBusy(f"output {self.output} was just locked by {describe(current or {})}; "
                             "wait for it to finish, or use another --output")
        self._beating = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._beating.start()
        return note

    def check(self) -> None:
        """Raise OutputBusy if another job has taken the lock over."""
        if self.lost is not None:
            raise OutputBusy(f"output {self.output} was taken over by {describe(self.lost)} while this run wrote "
                             "to it; this run stops, and the files it committed stay")

    def release(self) -> None:
        self._stop.set()
        if self._beating:
            self._beating.join()
        current = self._read()
        if current and current["run_id"] == self.holder["run_id"]:
            self.fs.delete_file(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.lost is None:
            self._beat_once()

    def _beat_once(self) -> None:
        try:
            current = self._read()
            if current and current["run_id"] != self.holder["run_id"]:
                self.lost = current
            else:
                self._write()
        except OSError:
            pass  # a storage hiccup: the next beat tries again, well within STALE_AFTER_S

    def _write(self) -> None:
        storage.write_bytes(self.fs, self.path, json.dumps({**self.holder, "heartbeat": time.time()}).encode())

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # half written by a holder killed mid-write: nobody holds it
            return {"run_id": "", "host": "", "pid": 0, "heartbeat": 0}


def why_stale(holder: dict) -> str | None:
    """Why the lock of `holder` no longer holds anyone, or None while it does."""
    age = time.time() - holder.get("heartbeat", 0)
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f}s"
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", 0)):
        return f"its process {holder.get('pid')} is gone"
    return None


def describe(holder: dict) -> str:
    return f"label run {holder.get('run_id') or '?'} (host {holder.get('host') or '?'}, pid {holder.get('pid') or '?'})"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
