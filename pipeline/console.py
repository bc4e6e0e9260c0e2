"""What a job prints: plain lines, and a progress line that tqdm redraws in place on a terminal. In a log file or under
`imgjobs submit` (no terminal) progress lines are plain lines, one every few seconds. Both jobs print through it."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from datetime import datetime, timezone

from tqdm import tqdm

LOG_EVERY_S = 5.0  # progress lines in logs; a terminal redraws on every update
# What a terminal acts on, or cannot show, in a file name: C0 and C1 controls (ESC starts colour and cursor
# commands; CR and LF rewrite or fake lines), DEL, the line and paragraph separators, bidirectional overrides, and
# lone surrogates (names that are not UTF-8, which also fail to encode).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class Console:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._status: tqdm | None = None  # the progress line on a terminal, below the lines
        self._last_logged = float("-inf")
        self._lock = threading.Lock()  # lines come from the job's threads (Ray's start, the workers' relay)

    def line(self, text: str) -> None:
        with self._lock:
            if self._status is not None:
                self._status.clear()
            self.stream.write(printable(text) + "\n")
            self.stream.flush()
            if self._status is not None:
                self._status.refresh()

    def progress(self, text: str) -> None:
        if self.tty:
            with self._lock:
                if self._status is None:
                    # The terminal's size, and 80x24 where it says 0x0 (a bare pty): tqdm hides its line in 0 rows.
                    size = shutil.get_terminal_size()
                    self._status = tqdm(file=self.stream, bar_format="{desc}", ncols=size.columns, nrows=size.lines)
                self._status.set_description_str(printable(text))
        elif time.monotonic() - self._last_logged >= LOG_EVERY_S:
            self._last_logged = time.monotonic()
            self.line(text)

    def close(self) -> None:
        """Leave the last progress line on screen, ended."""
        with self._lock:
            if self._status is not None:
                self._status.close()
                self._status = None


class Named:
    """A Console for one of several runs that share it: each line and progress line starts with the run's name,
    unless it names the run already."""

    def __init__(self, console: Console, name: str):
        self.console, self.name = console, name

    def named(self, text: str) -> str:
        return text if text.startswith(f"{self.name}:") else f"{self.name}: {text}"

    def line(self, text: str) -> None:
        self.console.line(self.named(text))

    def progress(self, text: str) -> None:
        self.console.progress(self.named(text))

    def close(self) -> None:
        self.console.close()


def printable(text: str) -> str:
    """`text` with UNPRINTABLE characters written as Python escapes (\\x1b, \\r, \\u202e, \\udcff): a path on
    the console cannot recolour the terminal, move its cursor, rewrite a line or add one. Every line Console prints,
    and every error line, passes through it."""
    return UNPRINTABLE.sub(lambda match: ascii(match.group())[1:-1], text)


def timestamp(seconds: float) -> str:
    """A time.time() as ISO 8601 in UTC, as the summaries record start and end."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    """4:05, or 1:02:03 past an hour."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"

