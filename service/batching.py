"""In-process adaptive batching for the ``inline`` topology (entry and model in one process).

Greedy, timer-free batching: while the model is busy, requests queue up; as soon as it is free, it
takes everything queued (up to ``max_batch_size`` images) as one call. A lone request runs at once,
so low load adds no batching delay, and high load forms large batches by itself. Requests that have
waited longer than ``max_latency_ms`` when their turn comes are shed with :class:`Overloaded`.
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

    ``fn`` maps an (N, …) array to an (N, …) array; it runs on one dedicated thread, so the event
    loop keeps accepting and decoding requests while the model computes.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: float,
                 name: str = "model") -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be positive")
        self.fn, self.max_batch_size, self.max_latency_s = fn, max_batch_size, max_latency_ms / 1e3
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        if not 1 <= len(images) <= self.max_batch_size:
            raise ValueError(f"{len(images)} images in one call; expected 1 to {self.max_batch_size}")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
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
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            x = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
            try:
                out = await loop.run_in_executor(self._executor, self.fn, x)
            except Exception as e:  # the model failed: every caller of this batch gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            i = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(out[i:i + len(p.images)])
                i += len(p.images)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
