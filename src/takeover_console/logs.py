"""Logging set-up for the programs, and a limiter that counts repeats instead of flooding."""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Send log records to stderr in one line each."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


class RepeatLimiter:
    """Let a message with a given key through at most once per ``interval`` seconds.

    ``check(key)`` returns None to suppress, or the number of repeats suppressed since
    the last one let through, so the caller can log "(N more since)".
    """

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def check(self, key: str) -> int | None:
        """Return None when ``key`` was let through recently, else the count suppressed meanwhile."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


def repeats_note(count: int) -> str:
    """A suffix for a log line that stood for ``count`` suppressed repeats."""
    return f" ({count} more since the last report)" if count else ""
