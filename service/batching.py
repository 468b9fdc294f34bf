"""In-process adaptive batching for the ``inline`` topology (entry and model in one process).

Greedy, timer-free batching: while the model is busy, requests queue up; as soon as it is free, it
takes everything queued (up to ``max_batch_size`` images) as one call. A lone request runs at once,
so low load adds no batching delay, and high load forms large batches by itself. With ``workers``
> 1, that many calls run at once (one per model instance). Requests that have waited longer than
``max_latency_ms`` when their turn comes are shed with :class:`Overloaded`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class Overloaded(RuntimeError):
    """A request waited in the queue longer than the configured ``max_latency_ms``."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """``await batcher(images)`` → ``fn(images)``, with concurrent callers' images run together.

    ``fn`` maps an (N, …) array to an (N, …) array; it runs on ``workers`` dedicated threads (it must
    be thread-safe when ``workers`` > 1), so the event loop keeps accepting and decoding requests
    while the model computes.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: float,
                 name: str = "model", workers: int = 1) -> None:
        if max_batch_size < 1 or workers < 1:
            raise ValueError("max_batch_size and workers must be positive")
        self.fn, self.max_batch_size, self.max_latency_s = fn, max_batch_size, max_latency_ms / 1e3
        self.workers = workers
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"infer-{name}")

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        if not 1 <= len(images) <= self.max_batch_size:
            raise ValueError(f"{len(images)} images in one call; expected 1 to {self.max_batch_size}")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake, self._idle = asyncio.Event(), asyncio.Semaphore(self.workers)
        pending = _Pending(images, loop.create_future())
        self._queue.append(pending)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._consume())
        self._wake.set()
        return await pending.future

    def _take(self) -> list[_Pending]:
        """Queued requests for the next call: FIFO, up to max_batch_size images; stale ones are shed."""
        batch, n, now = [], 0, time.monotonic()
        while self._queue and n + len(self._queue[0].images) <= self.max_batch_size:
            p = self._queue.popleft()
            if p.future.done():  # the client went away
                continue
            if now - p.queued > self.max_latency_s:
                p.future.set_exception(Overloaded(
                    f"request waited {1e3 * (now - p.queued):.0f} ms in the queue (max_latency_ms="
                    f"{1e3 * self.max_latency_s:.0f}); the service is overloaded"))
                continue
            batch.append(p)
            n += len(p.images)
        return batch

    async def _consume(self) -> None:
        while True:
            await self._idle.acquire()  # a worker is free: the next batch is whatever has queued by now
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                self._idle.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        x = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, x)
        except Exception as e:  # the model failed: every caller of this batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        finally:
            self._idle.release()
        i = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(out[i:i + len(p.images)])
            i += len(p.images)

    def close(self) -> None:
        for task in (self._task, *self._running):
            if task is not None:
                task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
