"""Units that crash their read task: a decoder's native crash (a segfault in a codec) ends the whole process, which
no `except` catches, and Ray Data runs a failed read task again without end. So each read task counts its
attempts at a unit, and once a unit has been started CAREFUL_AFTER times without finishing, its files are decoded
one by one in forked children: a crash then costs its own file a `decode` row, and the unit finishes.

A labeling pass counts in the output folder (ATTEMPTS/, which Parquet readers skip). The counts are a run's own:
the next run, which holds the output's lock, clears them before it starts (clear), so a job that was killed twice
does not make its rerun careful. A pass that writes no output (--calibration's) counts in a PassAttempts actor,
which lasts as long as the pass.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.formats.archives import Refused

ATTEMPTS = "_attempts"
CAREFUL_AFTER = 2  # crashed attempts before the third is careful
T = TypeVar("T")


class Crashed(Refused):
    """Decoding the file ended its process."""


class Attempts:
    """The count of started, unfinished attempts at the units of the output folder `base` in `fs`."""

    def __init__(self, fs: pafs.FileSystem, base: str):
        self.fs, self.base = fs, base

    def start(self, unit: str) -> bool:
        """Count this attempt at `unit`; whether it must be careful (the earlier ones crashed)."""
        try:
            earlier = int(storage.read_bytes(self.fs, self._path(unit)))
        except (FileNotFoundError, ValueError):
            earlier = 0
        storage.write_bytes(self.fs, self._path(unit), str(earlier + 1).encode())
        return earlier >= CAREFUL_AFTER

    def finish(self, unit: str) -> None:
        try:
            self.fs.delete_file(self._path(unit))
        except FileNotFoundError:
            pass

    def _path(self, unit: str) -> str:
        return f"{self.base}/{ATTEMPTS}/{hashlib.blake2b(unit.encode(), digest_size=16).hexdigest()}"


class PassAttempts:
    """Attempts as Attempts counts them, for a pass that writes no output, as a Ray actor (pipeline.label.job.run)
    that read tasks call through reading.CountedBy. Only the unfinished units are held."""

    def __init__(self):
        self.started: dict[str, int] = {}

    def start(self, unit: str) -> bool:
        earlier = self.started.get(unit, 0)
        self.started[unit] = earlier + 1
        return earlier >= CAREFUL_AFTER

    def finish(self, unit: str) -> None:
        self.started.pop(unit, None)


def clear(fs: pafs.FileSystem, base: str) -> None:
    """Forget earlier runs' counts in the output folder `base` in `fs`."""
    if fs.get_file_info(f"{base}/{ATTEMPTS}").type != pafs.FileType.NotFound:
        fs.delete_dir(f"{base}/{ATTEMPTS}")


def in_child(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a forked child: its result or its exception, or Crashed where the child died of a signal."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return into the parent's code
        os.close(read_end)
        faulthandler.disable()  # its crash is a row, not a traceback in the log
        try:
            result = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            result = (False, e)
        with os.fdopen(write_end, "wb") as out:
            out.write(pickle.dumps(result))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as result_in:
        payload = result_in.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not payload:
        raise Crashed(f"decoding this file crashed its process (signal {os.WTERMSIG(status)}); the file is skipped"
                      if os.WIFSIGNALED(status) else "decoding this file ended its process")
    ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value
