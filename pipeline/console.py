"""What a job prints: plain lines, and a progress line that redraws in place on a terminal. In a log file or under
`imgjobs submit` (no terminal) progress lines are plain lines, one every few seconds."""

from __future__ import annotations

import sys
import threading
import time

LOG_EVERY_S = 5.0  # progress lines in logs; a terminal redraws on every update


class Console:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._drawn = False  # a progress line is on screen, without its newline
        self._last_logged = float("-inf")
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\r\033[K")
                self._drawn = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, text: str) -> None:
        if self.tty:
            with self._lock:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self._drawn = True
        elif time.monotonic() - self._last_logged >= LOG_EVERY_S:
            self._last_logged = time.monotonic()
            self.line(text)

    def close(self) -> None:
        """Leave the last progress line on screen, ended."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False


def duration(seconds: float) -> str:
    """4:05, or 1:02:03 past an hour."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
