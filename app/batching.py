"""Dynamic batching: concurrent calls of one model method become one forward pass.

One worker task per (model, method, key) drains a queue: it takes what is queued,
waits at most `max_wait` for more (up to `max_size` rows), concatenates along each
argument's batch dimension, runs the function on the single compute thread and
splits the result back. Requests that arrive while a pass runs form the next batch,
so a loaded server batches itself even with `max_wait` = 0, and an idle one adds no
delay. If a batched call raises, each request is retried alone so one bad input
cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from torch import Tensor

Result = Tensor | tuple[Tensor, ...]


class ComputeTimeout(Exception):
    """The forward pass did not finish within the request's time budget."""


@dataclass
class _Item:
    args: tuple[Tensor, ...]
    size: int
    future: asyncio.Future[Result]


class Batcher:
    def __init__(self, fn: Callable[..., Result], batch_dims: Sequence[int], max_size: int, max_wait_s: float,
                 executor: Executor, timeout_s: float | None = None) -> None:
        self.fn, self.batch_dims, self.timeout_s = fn, tuple(batch_dims), timeout_s
        self.max_size, self.max_wait_s, self.executor = max_size, max_wait_s, executor
        self.queue: collections.deque[_Item] = collections.deque()
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        self.batches = 0  # passes run; with `requests`, tells how much batching happened
        self.requests = 0

    async def __call__(self, *args: Tensor) -> Result:
        size = args[0].shape[self.batch_dims[0]]
        item = _Item(args, size, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        self.wakeup.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._run_forever())
        try:
            return await asyncio.wait_for(item.future, self.timeout_s)
        except TimeoutError:
            # wait_for cancelled the future: the worker skips it if it has not started yet.
            raise ComputeTimeout(self.timeout_s) from None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            items = [self.queue.popleft()]
            size = items[0].size
            deadline = loop.time() + self.max_wait_s
            while size < self.max_size:
                if not self.queue:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self.wakeup.clear()
                    try:
                        await asyncio.wait_for(self.wakeup.wait(), remaining)
                    except TimeoutError:
                        break
                    continue
                if size + self.queue[0].size > self.max_size:
                    break
                item = self.queue.popleft()
                items.append(item)
                size += item.size
            items = [i for i in items if not i.future.cancelled()]
            if items:
                await loop.run_in_executor(self.executor, self._run_batch, items, loop)

    def _run_batch(self, items: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        """Runs on the compute thread; results are handed back to the event loop thread-safely."""
        self.batches += 1
        self.requests += len(items)
        try:
            if len(items) == 1:
                results = [self.fn(*items[0].args)]
            else:
                args = [torch.cat([it.args[a] for it in items], dim=d) for a, d in enumerate(self.batch_dims)]
                results = _split(self.fn(*args), [it.size for it in items])
        except Exception as e:
            if len(items) == 1:
                _settle(loop, items[0], None, e)
                return
            for it in items:  # isolate the failure: each request alone
                try:
                    _settle(loop, it, self.fn(*it.args), None)
                except Exception as e:
                    _settle(loop, it, None, e)
            return
        for it, res in zip(items, results, strict=True):
            _settle(loop, it, res, None)


def _split(result: Result, sizes: list[int]) -> list[Result]:
    if isinstance(result, tuple):
        parts = [torch.split(r, sizes, dim=0) for r in result]
        return [tuple(p[i] for p in parts) for i in range(len(sizes))]
    return list(torch.split(result, sizes, dim=0))


def _settle(loop: asyncio.AbstractEventLoop, item: _Item, result: Result | None, exc: BaseException | None) -> None:
    def apply() -> None:
        if item.future.done():
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)  # type: ignore[arg-type]

    loop.call_soon_threadsafe(apply)
