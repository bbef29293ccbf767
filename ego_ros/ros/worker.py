# SPDX-License-Identifier: Apache-2.0
"""The one thread that owns the model: every inference of the node runs here, never on the executor thread.

Why one thread: the model (and its GPU memory) is not safe to drive from two threads, and a second concurrent
generation would only halve the speed of both. Why a queue with priorities: a person waiting on ``ask`` must not
wait behind a backlog of recognition frames. Why coalescing: when the model is slower than ``recognition_rate_hz``,
only the newest frame of each camera is worth analysing; older pending ones are cancelled, never queued up.

    worker = InferenceWorker()
    future = worker.submit(lambda: ego.ask(question, images), priority=Priority.USER, label="ask")
    worker.submit_periodic(("recognize", camera), lambda: ego.recognize(frame.image))
    future.add_done_callback(...)   # or future.result(timeout) from a service callback in another thread
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable


class Priority(enum.IntEnum):
    USER = 0  # services and action goals: someone is waiting
    PERIODIC = 1  # recognition ticks: the next tick will bring a fresher frame anyway


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future
    label: str


class WorkerStopped(RuntimeError):
    """submit() after stop(): the node is deactivating."""


class InferenceWorker:
    """Runs submitted callables one at a time on a dedicated thread; results and exceptions come back as Futures.

    Order: all pending USER jobs (FIFO) before any PERIODIC job (FIFO by slot). A job already running is never
    interrupted by the worker; cancelling a generation mid-way is the job's business (e.g. a threading.Event
    checked by the engine's stopping criteria).
    """

    def __init__(self, name: str = "ego-inference"):
        self._cond = threading.Condition()
        self._user: deque[_Job] = deque()
        # key -> pending job; a replacement keeps its key's slot, so one busy camera cannot starve another.
        self._periodic: OrderedDict[Hashable, _Job] = OrderedDict()
        self._anonymous = itertools.count()  # keys for periodic jobs submitted without one (never coalesced)
        self._stopping = False
        self._busy = False
        self._running: str | None = None
        self.last_latency_sec: float | None = None
        self.last_job: str | None = None
        # Daemon: a generation stuck in the model must not keep the process alive after rclpy shuts down.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[], Any], *, priority: Priority = Priority.USER, label: str | None = None) -> Future:
        """Queue ``fn()``; FIFO within its priority. Raises WorkerStopped after stop()."""
        job = _Job(fn, Future(), label or getattr(fn, "__name__", "job"))
        with self._cond:
            self._check_running()
            if Priority(priority) is Priority.USER:
                self._user.append(job)
            else:
                self._periodic[("anonymous", next(self._anonymous))] = job
            self._cond.notify()
        return job.future

    def submit_periodic(self, key: Hashable, fn: Callable[[], Any], *, label: str | None = None) -> Future:
        """Queue a PERIODIC ``fn()``, replacing (and cancelling) the job still pending under ``key``, if any."""
        job = _Job(fn, Future(), label or str(key))
        with self._cond:
            self._check_running()
            stale = self._periodic.get(key)
            if stale is not None:
                stale.future.cancel()
            self._periodic[key] = job  # same key: same position in the order
            self._cond.notify()
        return job.future

    def _check_running(self) -> None:
        if self._stopping:
            raise WorkerStopped("the inference worker is stopped")

    # -- diagnostics -----------------------------------------------------------------------------------------

    def queue_length(self) -> int:
        """Pending jobs not cancelled by their callers (the running one is not counted; see ``busy``)."""
        with self._cond:
            jobs = itertools.chain(self._user, self._periodic.values())
            return sum(not job.future.cancelled() for job in jobs)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def running_job(self) -> str | None:
        """The label of the job running now (None: idle), for logs while someone waits for it."""
        return self._running

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- running ---------------------------------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        with self._cond:
            while not (self._user or self._periodic or self._stopping):
                self._cond.wait()
            if self._user:
                job = self._user.popleft()
            elif self._periodic:
                job = self._periodic.popitem(last=False)[1]
            else:
                return None  # stopping and drained
            self._busy = True
            return job

    def _run(self) -> None:
        _name_os_thread(self._thread.name)
        while (job := self._next_job()) is not None:
            # False when the caller cancelled it while pending: skip without running.
            if job.future.set_running_or_notify_cancel():
                self._running = job.label
                start = time.perf_counter()
                try:
                    result = job.fn()
                except BaseException as error:  # noqa: BLE001 - a failing job must never kill the model thread
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
                self.last_latency_sec = time.perf_counter() - start
                self.last_job = job.label
            with self._cond:
                self._busy, self._running = False, None

    def stop(self, timeout: float | None = None, *, drain: bool = False) -> bool:
        """Refuse new jobs; cancel the pending ones (or, with ``drain``, run them first); wait for the thread.

        The running job is always let finish (cancel it through its own event first if it is a long generation).
        Returns whether the thread ended within ``timeout``.
        """
        with self._cond:
            self._stopping = True
            if not drain:
                for job in itertools.chain(self._user, self._periodic.values()):
                    job.future.cancel()
                self._user.clear()
                self._periodic.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()


def _name_os_thread(name: str) -> None:
    """Give the OS thread the worker's name (Linux), so that ``top -H`` and /proc/PID/task/*/comm show whether the
    model's thread is still there (Python before 3.14 names only its own Thread objects)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME; the kernel keeps 15 bytes
    except (OSError, AttributeError):
        pass  # not Linux: nothing to name
