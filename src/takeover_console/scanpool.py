"""A small pool of persistent threads that run batches of short tasks, for the fd-table sampler.

The thread that calls ``run()`` works on the batch too, so a pool of ``threads`` has
``threads - 1`` helper threads, and a pool of 1 runs every task inline. Each task is
called with its Batch and may add more tasks to it, which any thread of the pool
picks up.

This only pays for tasks that spend most of their time in system calls that release
the GIL, such as os.readlink(). Pure Python work gets slower on more threads.

Helper threads are daemon threads and start at the first ``run()``, so a pool never
keeps the interpreter alive. ``close()`` ends them, and a closed pool still runs
batches on the calling thread alone.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # seconds close() waits for each helper thread to end

Task = Callable[["Batch"], None]


class Batch:
    """Tasks that run to completion together; a task may add more with ``add()``."""

    def __init__(self, tasks: Iterable[Task]):
        self._tasks: collections.deque[Task] = collections.deque(tasks)
        self._unfinished = len(self._tasks)
        self._changed = threading.Condition(threading.Lock())
        self.error: BaseException | None = None

    def add(self, task: Task) -> None:
        """Queue one more task; call it only from a task of this batch, before that task returns."""
        with self._changed:
            self._tasks.append(task)
            self._unfinished += 1
            self._changed.notify()

    def work(self) -> None:
        """Run tasks of this batch until every task, on any thread, has finished."""
        while True:
            with self._changed:
                # A running task may still add tasks, so wait rather than leave.
                while not self._tasks and self._unfinished:
                    self._changed.wait()
                if not self._tasks:
                    return
                task = self._tasks.popleft()
            try:
                task(self)
            except BaseException as exc:  # re-raised by run() on the calling thread
                with self._changed:
                    if self.error is None:
                        self.error = exc
            finally:
                with self._changed:
                    self._unfinished -= 1
                    if not self._unfinished:
                        self._changed.notify_all()


class ScanPool:
    """Run batches of tasks on the calling thread and ``threads - 1`` daemon threads."""

    def __init__(self, threads: int, name: str = "scan"):
        if threads < 1:
            raise ValueError(f"invalid thread count {threads}; expected 1 or more")
        self.threads = threads
        self._name = name
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, tasks: Iterable[Task]) -> None:
        """Run ``tasks`` and every task they add; return when all have finished.

        The first exception a task raised is raised here, after the others finished.
        Calls from several threads at once are allowed, and their batches share the
        helper threads.
        """
        batch = Batch(tasks)
        helpers = self._start_helpers()
        for _ in range(helpers):
            self._inbox.put(batch)
        batch.work()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        """End the helper threads; a batch in progress is finished by its calling thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            helpers = list(self._helpers)
        for _ in helpers:
            self._inbox.put(None)
        current = threading.current_thread()
        for thread in helpers:
            if thread is not current:
                thread.join(CLOSE_TIMEOUT)
                if thread.is_alive():
                    log.warning("%s did not end within %g s of close()", thread.name, CLOSE_TIMEOUT)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def helper_threads(self) -> list[threading.Thread]:
        """Return the helper threads started so far (for tests and diagnostics)."""
        with self._lock:
            return list(self._helpers)

    def _start_helpers(self) -> int:
        """Start the helper threads on first use; return how many a batch can use."""
        with self._lock:
            if self._closed:
                return 0
            while len(self._helpers) < self.threads - 1:
                thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._helpers) + 1}", daemon=True)
                thread.start()
                self._helpers.append(thread)
            return len(self._helpers)

    def _serve(self) -> None:
        while True:
            batch = self._inbox.get()
            if batch is None:
                return
            batch.work()
            # Drop the reference, so a finished batch and what its tasks hold can be freed.
            del batch
