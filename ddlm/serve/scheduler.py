"""Dynamic batching: requests wait in a bounded queue; one worker thread takes the oldest and every waiting
request with the same settings (up to the largest compiled batch size) and decodes their rows together.

    scheduler = Scheduler(engine, max_queue=64, max_wait_s=0.01)
    scheduler.start()
    job = Job(rows, settings, loop, deadline)     # rows: engine.Row, one per generation
    scheduler.submit(job)                          # QueueFull (503) when max_queue jobs wait
    await job.done                                 # job.tokens, job.nfe; job.events gets live canvases
    job.cancel()                                   # the client left: its place in the queue is freed

A batch is formed when the worker is free: requests that arrived while a batch ran, or within max_wait_s of
the first one, go together. Jobs are never split across batches (a job's rows are at most the largest batch).
A job whose deadline passes while it waits is dropped with TimeoutError; one cancelled while its batch runs
is dropped when the batch ends (a compiled loop is not interrupted). `metrics()` says what happened: batch
sizes, queue length, compiles.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from absl import logging


class QueueFull(RuntimeError):
    """The queue holds max_queue waiting requests (503)."""


class JobCancelled(Exception):
    """The job was cancelled (its client left) before it was answered."""


class Job:
    """A request's rows and how to answer it. Lives on the event loop `loop`; the worker thread reaches it
    only through loop.call_soon_threadsafe."""

    def __init__(
        self, rows, settings, loop: asyncio.AbstractEventLoop, deadline: float, *, live: bool = False
    ):
        self.rows = rows
        self.settings = settings
        self.loop = loop
        self.deadline = deadline
        self.live = live  # whether canvases are sent to `events`
        self.done: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.created = time.monotonic()
        self.started: float | None = None
        self.tokens = None  # int32 [rows, L] when done
        self.nfe = None
        self.batch_size = 0  # rows of the batch it ran in (padding excluded)
        self.compiled_size = 0
        self._scheduler = None
        for r in rows:
            r.owner = self

    def cancel(self, reason: str = "cancelled") -> None:
        """The client is gone (or its time is up: reason 'timeouts'): leaves the queue now (its place is free),
        or is dropped when its batch ends."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler.remove(self, reason)

    # called on the worker thread --------------------------------------------------------------------------

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        def resolve():
            if self.done.done():
                return
            if error is not None:
                self.done.set_exception(error)
            else:
                self.done.set_result(result)

        self._post(resolve)


class Scheduler:
    """The queue and the worker thread that runs batches on `engine` (ddlm.serve.engine.Engine)."""

    def __init__(self, engine, *, max_queue: int = 64, max_wait_s: float = 0.01):
        self.engine = engine
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._running: list[Job] = []
        self.counts = collections.Counter()  # requests, completed, rejected, timeouts, cancelled, failed, ...
        self.batch_rows = collections.Counter()  # rows in a batch -> batches
        self.last_batch: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------- control

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ddlm-serve-batches", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pause(self) -> None:
        """No new batch starts until resume() (the running one finishes): requests wait in the queue."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------- queue

    def submit(self, job: Job) -> None:
        """Queues `job`; QueueFull when max_queue jobs already wait."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                self.counts["rejected_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting): retry later")
            self.counts["requests"] += 1
            job._scheduler = self
            self._queue.append(job)
            self._cond.notify_all()

    def remove(self, job: Job, reason: str = "cancelled") -> None:
        """Takes a cancelled job out of the queue (no-op once its batch started); counts it under `reason`."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return
            self.counts[reason] += 1
        job._finish(error=JobCancelled())

    def metrics(self) -> dict:
        with self._cond:
            waiting = len(self._queue)
            running = sum(len(j.rows) for j in self._running)
            counts = dict(self.counts)
            rows = {str(k): v for k, v in sorted(self.batch_rows.items())}
            last = dict(self.last_batch)
        return {
            "queue": waiting,
            "max_queue": self.max_queue,
            "running_rows": running,
            "paused": self._paused,
            "batches": sum(self.batch_rows.values()),
            "batch_rows": rows,  # rows in a batch -> number of such batches
            "max_batch_rows": max(self.batch_rows, default=0),
            "last_batch": last,
            "batch_sizes": list(self.engine.batch_sizes),
            "compiles": self.engine.compiles,
            "compile_seconds": round(self.engine.compile_seconds, 3),
            **counts,
        }

    # ---------------------------------------------------------------------------------------- worker

    def _next_batch(self) -> list[Job] | None:
        """Waits for work, then takes the oldest job and the waiting jobs with its settings that fit."""
        with self._cond:
            while not self._stop and (self._paused or not self._queue):
                self._cond.wait(0.5)
                self._expire()
            if self._stop:
                return None
            first = self._queue[0]
            limit = self.engine.max_batch
            wait_until = time.monotonic() + self.max_wait_s
            while (
                not self._stop
                and not self._paused
                and sum(len(j.rows) for j in self._queue if j.settings.key == first.settings.key) < limit
                and time.monotonic() < wait_until
            ):
                self._cond.wait(max(0.0, wait_until - time.monotonic()))
            if self._paused or first not in self._queue:  # paused or cancelled while waiting: start over
                return []
            batch, rows = [], 0
            for job in list(self._queue):
                if job.settings.key == first.settings.key and rows + len(job.rows) <= limit:
                    batch.append(job)
                    rows += len(job.rows)
            for job in batch:
                self._queue.remove(job)
            self._running = batch
            return batch

    def _expire(self) -> None:
        """Drops the waiting jobs whose deadline passed (called with the lock held)."""
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            self.counts["timeouts"] += 1
            job._finish(error=TimeoutError())

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._cond:
                self._expire()
                live = [j for j in batch if not j.cancelled and j.deadline > time.monotonic()]
                for j in batch:
                    if j not in live:
                        self.counts["timeouts" if not j.cancelled else "cancelled"] += 1
                        j._finish(error=TimeoutError() if not j.cancelled else JobCancelled())
                self._running = live
            if not live:
                continue
            self._run(live)
            with self._cond:
                self._running = []

    def _run(self, jobs: list[Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        now = time.monotonic()
        for j in jobs:
            j.started = now

        def on_canvas(i, positions, tokens):
            job = rows[i].owner
            if job.live and not job.cancelled:
                job._post(job.events.put_nowait, ("canvas", rows[i], positions, tokens))

        try:
            watched = any(j.live for j in jobs)
            tokens, nfe, size = self.engine.run(rows, jobs[0].settings, on_canvas if watched else None)
        except Exception as e:  # noqa: BLE001 -- reported to the requests of this batch, the server goes on
            logging.exception("A batch of %d rows failed.", len(rows))
            with self._cond:
                self.counts["failed"] += len(jobs)
            for j in jobs:
                j._finish(error=e)
            return
        seconds = time.monotonic() - now
        with self._cond:
            self.batch_rows[len(rows)] += 1
            self.last_batch = {
                "rows": len(rows),
                "size": size,
                "requests": len(jobs),
                "seconds": round(seconds, 4),
            }
        i = 0
        for j in jobs:
            n = len(j.rows)
            j.tokens, j.nfe = tokens[i : i + n], nfe[i : i + n]
            j.batch_size, j.compiled_size = len(rows), size
            i += n
            with self._cond:
                self.counts["cancelled" if j.cancelled else "completed"] += 1
            if j.cancelled:
                j._finish(error=JobCancelled())
            else:
                j._finish(result=j)
