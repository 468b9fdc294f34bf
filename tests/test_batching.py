"""In-process adaptive batching (the service's ``MicroBatcher``) and model instance pools."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.backends import InstancePool
from service.batching import MicroBatcher, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_share_calls_and_get_their_own_rows():
    calls = []
    gate = threading.Event()

    def fn(x):
        calls.append(len(x))
        gate.wait(5)  # the first call blocks until every caller has queued
        return x * 10

    async def main():
        b = MicroBatcher(fn, max_batch_size=8, max_latency_ms=5000)
        first = asyncio.create_task(b(np.array([[0]])))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b(np.array([[i], [i + 100]]))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *rest)
        b.close()
        return out

    out = run(main())
    assert out[0].tolist() == [[0]]
    for i, o in enumerate(out[1:], 1):
        assert o.tolist() == [[10 * i], [10 * (i + 100)]]
    assert calls[0] == 1
    assert max(calls[1:]) > 2, calls  # queued requests ran together
    assert all(c <= 8 for c in calls) and sum(calls) == 11


def test_a_lone_request_runs_at_once():
    async def main():
        b = MicroBatcher(lambda x: x, max_batch_size=32, max_latency_ms=1000)
        t = time.perf_counter()
        await b(np.zeros((1, 3)))
        b.close()
        return time.perf_counter() - t

    assert run(main()) < 0.5


def test_model_errors_reach_every_caller_and_the_batcher_keeps_working():
    state = {"fail": True}

    def fn(x):
        if state["fail"]:
            raise RuntimeError("boom")
        return x

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_latency_ms=1000)
        with pytest.raises(RuntimeError, match="boom"):
            await b(np.zeros((2, 1)))
        state["fail"] = False
        out = await b(np.ones((2, 1)))
        b.close()
        return out

    assert run(main()).tolist() == [[1], [1]]


def test_requests_that_waited_too_long_are_shed():
    def slow(x):
        time.sleep(0.3)
        return x

    async def main():
        b = MicroBatcher(slow, max_batch_size=1, max_latency_ms=100)
        first = asyncio.create_task(b(np.zeros((1, 1))))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(b(np.zeros((1, 1))))
        results = await asyncio.gather(first, late, return_exceptions=True)
        b.close()
        return results

    first, late = run(main())
    assert isinstance(first, np.ndarray)
    assert isinstance(late, Overloaded) and "max_latency_ms" in str(late)


def test_oversized_calls_are_refused():
    async def main():
        b = MicroBatcher(lambda x: x, max_batch_size=2, max_latency_ms=100)
        try:
            await b(np.zeros((3, 1)))
        finally:
            b.close()

    with pytest.raises(ValueError, match="1 to 2"):
        run(main())


def test_workers_run_calls_at_once_and_each_caller_gets_its_rows():
    barrier = threading.Barrier(2, timeout=5)  # breaks (an error) unless two calls are in flight together
    calls = []

    def fn(x):
        calls.append(len(x))
        if len(calls) <= 2:
            barrier.wait()
        return x + 1

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_latency_ms=5000, workers=2)
        out = await asyncio.gather(*(b(np.full((1, 1), i)) for i in range(6)))
        b.close()
        return out

    out = run(main())
    assert [o.tolist() for o in out] == [[[i + 1]] for i in range(6)]
    assert sum(calls) == 6


def test_one_worker_never_overlaps_calls():
    busy, overlaps = threading.Lock(), []

    def fn(x):
        if not busy.acquire(blocking=False):
            overlaps.append(len(x))
            return x
        time.sleep(0.01)
        busy.release()
        return x

    async def main():
        b = MicroBatcher(fn, max_batch_size=1, max_latency_ms=5000)
        await asyncio.gather(*(b(np.zeros((1, 1))) for _ in range(5)))
        b.close()

    run(main())
    assert overlaps == []


def test_instance_pool_hands_each_concurrent_call_a_different_member():
    barrier = threading.Barrier(2, timeout=5)
    used = []

    def member(tag):
        def call(x):
            used.append(tag)
            barrier.wait()  # both members must be in use at the same moment
            return x * tag
        return call

    pool = InstancePool([member(2), member(3)])
    with ThreadPoolExecutor(2) as ex:
        out = sorted(int(r[0]) for r in ex.map(pool, [np.ones(1), np.ones(1)]))
    assert out == [2, 3] and sorted(used) == [2, 3]
    with pytest.raises(ValueError):
        InstancePool([])
