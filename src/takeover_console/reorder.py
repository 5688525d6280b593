"""Put the observations of several workers back in time order before the model folds them.

Each worker writes its events to its own pipe in batches (events.py flushes every 20 ms),
and the supervisor notices a worker's exit on yet another path. So the server's
"channel_down" can arrive after the supervisor's "forwarder killed", and the forwarder's
"taken" before the server's "accepted". Every observation carries the time it happened
("t", time.monotonic(), one clock for all processes on the machine), so holding each
one a short while and releasing them sorted by "t" restores the order.

NOTE: an observation that arrives more than ``delay`` after it happened (a worker
stalled, or a heavily loaded machine) is released at once, after later ones. The model
tolerates that; the order is then only mostly right.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable, Iterable
from operator import itemgetter

# Seconds an observation waits for older ones that are still on their way: the workers'
# 20 ms batching plus a margin for scheduling.
DEFAULT_DELAY = 0.05
# Seconds between two releases at least. Releasing each observation as soon as it is due
# woke the event loop for nearly every one: about 3.5% of a core at 4,000 a second.
RELEASE_INTERVAL = 0.025

_time_of = itemgetter("t")


class ReorderBuffer:
    """Hold observations for ``delay`` seconds of their own clock, then release them in time order.

    Every observation must carry a number in ``t``. Observations with equal times keep the
    order in which they were added.
    """

    def __init__(self, release: Callable[[list[dict]], None], delay: float = DEFAULT_DELAY):
        """``release`` gets each batch of due observations, oldest first."""
        self._release = release
        self._delay = delay
        # In the order added. Each release sorts the list by time (stable, and nearly linear,
        # since each worker's observations arrive mostly in order) and cuts off what is due:
        # cheaper at thousands a second than a heap push and pop for each one.
        self._pending: list[dict] = []
        self._earliest = math.inf  # the smallest "t" in _pending
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # time.monotonic() at which the timer fires
        self._quiet_until = 0.0  # no release before this time.monotonic()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, observation: dict) -> None:
        """Queue one observation; it is released once ``delay`` has passed since its ``t``."""
        self.extend((observation,))

    def extend(self, observations: Iterable[dict]) -> None:
        """Queue several observations, as ``add`` does for one."""
        start = len(self._pending)
        self._pending.extend(observations)
        if len(self._pending) == start:
            return
        self._earliest = min(self._earliest, min(map(_time_of, self._pending[start:])))
        self._schedule()

    def flush(self) -> None:
        """Release everything queued now, in time order."""
        self._cancel()
        due = sorted(self._pending, key=_time_of)
        self._pending.clear()
        self._earliest = math.inf
        if due:
            self._release(due)

    def _release_due(self) -> None:
        self._timer = None
        pending = self._pending
        pending.sort(key=_time_of)
        cut = bisect.bisect_right(pending, time.monotonic() - self._delay, key=_time_of)
        due = pending[:cut]
        del pending[:cut]
        self._earliest = pending[0]["t"] if pending else math.inf
        if due:
            self._release(due)
        self._quiet_until = time.monotonic() + RELEASE_INTERVAL
        self._schedule()

    def _schedule(self) -> None:
        if not self._pending:
            return
        due = max(self._earliest + self._delay, self._quiet_until)
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._release_due)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
