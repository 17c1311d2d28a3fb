"""Dynamic batching: concurrent calls of one model method become one forward pass.

The first call that finds the batcher idle schedules a drain for the next turn of the
event loop (or `max_wait` later); every call that arrives before it runs joins the
same pass, up to `max_size` rows. Requests that arrive while a pass runs form the
next batch, so a loaded server batches itself even with `max_wait` = 0, and an idle
one adds no delay. If a batched call raises, each request is retried alone so one
bad input cannot fail its neighbours.

Where a pass runs is decided per pass, from its measured cost. A short pass runs on
the event loop thread itself: handing it to another thread costs more than the pass
(thread wake-ups, and a Python thread needs the GIL back between torch ops, which a
busy event loop holds; figures in docs/benchmarks.md#serving). A pass expected to take longer than
`inline_max_s` goes to the compute thread so health checks and other requests keep
being answered meanwhile. No measurement yet means the compute thread.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from app import tracing
from app.exceptions import ComputeTimeout, Unavailable

Result = Tensor | tuple[Tensor, ...]
Outcome = tuple[Result | None, BaseException | None]


@dataclass
class _Item:
    args: tuple[Tensor, ...]
    size: int
    future: asyncio.Future[Result]
    enqueued: float = 0.0
    waited: float = 0.0  # from the call to the start of its pass
    # set only while tracing (app/tracing.py): when its pass ended, that pass's rows and requests
    done: float = 0.0
    rows: int = 0
    requests: int = 0


class ComputeThread:
    """The one thread that runs long passes, with its own torch thread count (OpenMP's
    setting is per calling thread). 0 leaves torch's default alone."""

    def __init__(self, inline_threads: int = 0, compute_threads: int = 0) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute",
                                           initializer=torch.set_num_threads if compute_threads else None,
                                           initargs=(compute_threads,) if compute_threads else ())
        # A pass here uses fewer cores than the same pass on the event loop. Its time, scaled
        # by this, is what the event loop would take: the estimate that decides where a pass
        # runs. Without it a pass measured here just over the inline budget would never be
        # tried on the event loop, where it fits (a one-image k=64 anomaly score, say).
        self.inline_scale = compute_threads / inline_threads if inline_threads and compute_threads else 1.0

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


class Batcher:
    def __init__(self, fn: Callable[..., Result], batch_dims: Sequence[int], max_size: int, max_wait_s: float,
                 compute: ComputeThread | None, timeout_s: float | None = None, inline_max_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter,
                 observer: Callable[[int, list[float]], None] | None = None, name: str = "") -> None:
        self.fn, self.batch_dims, self.timeout_s = fn, tuple(batch_dims), timeout_s
        self.name = name  # the model method, for trace spans
        self.clock = clock  # times passes; tests give a fake one
        self.observer = observer  # told (rows, each request's wait) after every pass: the metrics
        self.max_size, self.max_wait_s, self.compute = max_size, max_wait_s, compute
        self.inline_max_s = inline_max_s
        self.queue: collections.deque[_Item] = collections.deque()
        self.queued_rows = 0
        self.drain_handle: asyncio.Handle | None = None
        self.busy = False  # a pass is running on the compute thread
        self.closed = False
        self.pass_seconds: dict[int, float] = {}  # moving average of pass time by rows.bit_length()
        self.batches = 0  # passes run; with `requests`, tells how much batching happened
        self.requests = 0
        self.inline_batches = 0
        self.isolated_batches = 0  # batched passes that failed and were run again one request at a time

    async def __call__(self, *args: Tensor) -> Result:
        if self.closed:
            raise Unavailable("the service is shutting down")
        loop = asyncio.get_running_loop()
        item = _Item(args, args[0].shape[self.batch_dims[0]], loop.create_future(), time.perf_counter())
        self.queue.append(item)
        self.queued_rows += item.size
        if not self.busy:
            if self.queued_rows >= self.max_size:
                self._schedule(loop, 0.0)
            elif self.drain_handle is None:
                self._schedule(loop, self.max_wait_s)
        timer = loop.call_later(self.timeout_s, _expire, item.future, self.timeout_s) if self.timeout_s else None
        try:
            result = await item.future
        finally:
            if timer is not None:
                timer.cancel()
        if tracing.tracer is not None:
            tracing.batch_spans(self.name, item.enqueued, item.enqueued + item.waited, item.done, item.rows,
                                item.requests)
        return result

    def close(self) -> None:
        """Shutting down: every queued request is answered (503) now; a pass already running finishes."""
        self.closed = True
        if self.drain_handle is not None:
            self.drain_handle.cancel()
        for item in self.queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("the service is shutting down"))
        self.queue.clear()
        self.queued_rows = 0

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self.drain_handle is not None:
            self.drain_handle.cancel()
        self.drain_handle = loop.call_later(delay, self._drain) if delay > 0 else loop.call_soon(self._drain)

    def _take(self) -> list[_Item]:
        """Up to max_size rows from the queue; requests that timed out or went away are dropped."""
        items: list[_Item] = []
        size = 0
        now = time.perf_counter()
        while self.queue and (not items or size + self.queue[0].size <= self.max_size):
            item = self.queue.popleft()
            self.queued_rows -= item.size
            if not item.future.done():
                item.waited = now - item.enqueued
                items.append(item)
                size += item.size
        return items

    def _drain(self) -> None:
        """Runs on the event loop: start the next pass, inline when it is known to be short."""
        self.drain_handle = None
        loop = asyncio.get_running_loop()
        while self.queue and not self.busy and not self.closed:
            items = self._take()
            if not items:
                continue
            if self.compute is None or self._runs_inline(sum(it.size for it in items)):
                self.inline_batches += 1
                outcomes, seconds, isolated = self._compute(items)
                self._record(items, seconds, isolated)
                _settle(items, outcomes)
                if self.queue:  # more than max_size rows were queued: let the loop breathe, then go on
                    self._schedule(loop, 0.0)
                return
            self.busy = True
            done = self.compute.submit(self._compute, items)
            done.add_done_callback(lambda f, items=items: self._pass_done(f, items))  # type: ignore[misc]
            return

    def _runs_inline(self, rows: int) -> bool:
        expected = self.expected_seconds(rows)
        return expected is not None and expected <= self.inline_max_s

    def expected_seconds(self, rows: int) -> float | None:
        """A pass's time from passes of similar size; over-estimates where it has to guess."""
        bucket = rows.bit_length()
        if bucket in self.pass_seconds:
            return self.pass_seconds[bucket]
        larger = [t for b, t in self.pass_seconds.items() if b > bucket]
        if larger:
            return min(larger)  # more rows never take less time
        smaller = [b for b in self.pass_seconds if b < bucket]
        if smaller:
            b = max(smaller)
            return self.pass_seconds[b] * rows / (1 << (b - 1))  # linear from the smallest row count it covers
        return None

    def _pass_done(self, done: asyncio.Future[tuple[list[Outcome], float, bool]], items: list[_Item]) -> None:
        self.busy = False
        if done.cancelled():
            outcomes: list[Outcome] = [(None, asyncio.CancelledError())] * len(items)
        elif done.exception() is not None:
            outcomes = [(None, done.exception())] * len(items)
        else:
            outcomes, seconds, isolated = done.result()
            assert self.compute is not None
            self._record(items, seconds * self.compute.inline_scale, isolated)
        _settle(items, outcomes)
        if self.queue and not self.closed:
            self._drain()

    def _compute(self, items: list[_Item]) -> tuple[list[Outcome], float, bool]:
        """One pass over the gathered requests, its duration, and whether it had to fall back to one
        request at a time; runs on whichever thread `_drain` chose, so it touches no shared state."""
        start = self.clock()
        isolated = False
        try:
            if len(items) == 1:
                outcomes: list[Outcome] = [(self.fn(*items[0].args), None)]
            else:
                args = [torch.cat([it.args[a] for it in items], dim=d) for a, d in enumerate(self.batch_dims)]
                outcomes = [(r, None) for r in _split(self.fn(*args), [it.size for it in items])]
        except Exception as e:
            if len(items) == 1:
                outcomes = [(None, e)]
            else:
                isolated = True
                outcomes = [_alone(self.fn, it) for it in items]  # isolate the failure: each request alone
        return outcomes, self.clock() - start, isolated

    def _record(self, items: list[_Item], seconds: float, isolated: bool) -> None:
        """On the event loop: count the pass and update the estimate for its size."""
        self.batches += 1
        self.isolated_batches += isolated
        self.requests += len(items)
        rows = sum(it.size for it in items)
        bucket = rows.bit_length()
        self.pass_seconds[bucket] = 0.8 * self.pass_seconds.get(bucket, seconds) + 0.2 * seconds
        if self.observer is not None:
            self.observer(rows, [it.waited for it in items])


class LoopTurnGroup:
    """Runs `fn` for every call made during one turn of the event loop, back to back.

    For per-request CPU work that cannot share one tensor op, such as decoding each
    uploaded PNG. Done inside each request's own handler, interleaved with the HTTP
    stack, the same decode costs several times more, because back to back the code and
    data stay in the CPU caches (docs/benchmarks.md#serving). One failing call fails
    only its own request.
    """

    def __init__(self, fn: Callable[..., Any] | None = None,
                 many: Callable[[list[tuple[Any, ...]]], list[Any]] | None = None) -> None:
        """`fn(*args)` per call, or `many([args, ...])` once for the turn's calls, answering each call's
        result or the Exception that fails it alone: for work that is cheaper on all of them at once."""
        assert (fn is None) != (many is None)
        self.fn, self.many = fn, many
        self.queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.handle: asyncio.Handle | None = None

    async def __call__(self, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.append((args, future))
        if self.handle is None:
            self.handle = loop.call_soon(self._run)
        return await future

    def _run(self) -> None:
        self.handle = None
        queue, self.queue = self.queue, []
        live = [(args, future) for args, future in queue if not future.done()]  # cancelled: not done at all
        if self.many is not None:
            try:
                outcomes = self.many([args for args, _ in live])
            except Exception as e:
                outcomes = [e] * len(live)
            for (_, future), outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return
        assert self.fn is not None
        for args, future in live:
            try:
                future.set_result(self.fn(*args))
            except Exception as e:
                future.set_exception(e)


def _alone(fn: Callable[..., Result], item: _Item) -> Outcome:
    try:
        return fn(*item.args), None
    except Exception as e:
        return None, e


def _split(result: Result, sizes: list[int]) -> list[Result]:
    if isinstance(result, tuple):
        parts = [torch.split(r, sizes, dim=0) for r in result]
        return [tuple(p[i] for p in parts) for i in range(len(sizes))]
    return list(torch.split(result, sizes, dim=0))


def _settle(items: list[_Item], outcomes: list[Outcome]) -> None:
    if tracing.tracer is not None:
        done, rows = time.perf_counter(), sum(it.size for it in items)
        for item in items:
            item.done, item.rows, item.requests = done, rows, len(items)
    for item, (result, exc) in zip(items, outcomes, strict=True):
        if item.future.done():
            continue
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)  # type: ignore[arg-type]


def _expire(future: asyncio.Future[Result], timeout_s: float) -> None:
    if not future.done():
        future.set_exception(ComputeTimeout(f"no result within {timeout_s} s (VAE_REQUEST_TIMEOUT_S)"))
