"""Dynamic batching gives each caller exactly what an unbatched call would."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from app.batching import Batcher, ComputeThread, LoopTurnGroup
from app.exceptions import ComputeTimeout, Unavailable


def fragile(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Fails the whole call if any row is NaN, like a model that cannot take a bad input."""
    if bool(torch.isnan(x).any()):
        raise ValueError("NaN input")
    return (x * 2).sum(-1) + eps.sum(0).sum(-1)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("max_wait_s", [0.0, 0.01])
def test_concurrent_calls_share_a_pass_and_match_unbatched(max_wait_s: float) -> None:
    compute = ComputeThread()
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(n, 3, generator=gen), torch.randn(4, n, 2, generator=gen)) for n in (1, 2, 1, 3)]

    async def main() -> tuple[list[torch.Tensor], Batcher]:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=max_wait_s, compute=compute)
        out = await asyncio.gather(*(b(x, e) for x, e in inputs))
        b.close()
        return out, b

    results, batcher = run(main())
    assert batcher.requests == 4 and batcher.batches == 1
    assert batcher.isolated_batches == 0  # one shared pass, split back: no fallback to one at a time
    for (x, e), got in zip(inputs, results, strict=True):
        torch.testing.assert_close(got, fragile(x, e))


def test_tuple_results_are_split_back_to_their_requests() -> None:
    """encode and forward return tuples: every part of it must be split by request, along the batch."""

    def pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(-1)

    inputs = [torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 10 * n for n in (1, 3, 2)]

    async def main() -> tuple[list, Batcher]:
        b = Batcher(pair, (0,), max_size=64, max_wait_s=0.0, compute=None)
        return await asyncio.gather(*(b(x) for x in inputs)), b

    results, b = run(main())
    assert (b.batches, b.isolated_batches) == (1, 0)
    for x, (doubled, sums) in zip(inputs, results, strict=True):
        assert torch.equal(doubled, x * 2) and torch.equal(sums, x.sum(-1))


def test_max_size_splits_passes() -> None:
    compute = ComputeThread()

    async def main() -> Batcher:
        b = Batcher(lambda x: x + 1, (0,), max_size=4, max_wait_s=0.0, compute=compute)
        outs = await asyncio.gather(*(b(torch.full((3, 1), float(i))) for i in range(4)))
        for i, o in enumerate(outs):
            assert o.shape == (3, 1) and float(o[0, 0]) == i + 1
        b.close()
        return b

    b = run(main())
    assert b.batches == 4  # 3 + 3 > 4: every request ran alone


@pytest.mark.parametrize(("compute", "sizes", "passes"), [(None, (2, 2, 2, 2), 2), (None, (3, 3, 3), 3),
                                                          ("thread", (2, 2, 2, 2), 2)])
def test_a_pass_fills_up_to_max_size_rows_exactly(compute: str | None, sizes: tuple[int, ...], passes: int) -> None:
    """4 rows fit a max_size of 4; what does not fit waits for the next pass, inline or on the thread."""
    thread = ComputeThread() if compute else None

    async def main() -> Batcher:
        b = Batcher(lambda x: x + 1, (0,), max_size=4, max_wait_s=0.0, compute=thread)
        outs = await asyncio.gather(*(b(torch.full((n, 1), float(i))) for i, n in enumerate(sizes)))
        assert [o[:, 0].tolist() for o in outs] == [[i + 1.0] * n for i, n in enumerate(sizes)]
        return b

    try:
        b = run(main())
    finally:
        if thread:
            thread.shutdown()
    assert (b.batches, b.requests, b.isolated_batches) == (passes, len(sizes), 0)


def test_one_bad_request_does_not_fail_its_neighbours() -> None:
    compute = ComputeThread()
    isolated: list[int] = []
    good = torch.ones(2, 3)
    bad = torch.full((1, 3), float("nan"))
    eps = torch.zeros(1, 2, 2)

    async def main() -> list:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=0.0, compute=compute)
        out = await asyncio.gather(b(good, eps), b(bad, eps[:, :1]), b(good, eps), return_exceptions=True)
        b.close()
        isolated.append(b.isolated_batches)
        return out

    first, second, third = run(main())
    torch.testing.assert_close(first, torch.full((2,), 6.0))
    assert isinstance(second, ValueError)
    assert isolated == [1]  # the shared pass failed once, and was redone one request at a time
    torch.testing.assert_close(third, torch.full((2,), 6.0))


def test_inline_batcher_gathers_one_loop_turn_into_one_pass() -> None:
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(n, 3, generator=gen), torch.randn(4, n, 2, generator=gen)) for n in (2, 1, 3)]

    async def main() -> tuple[list[torch.Tensor], Batcher]:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=0.0, compute=None)
        return await asyncio.gather(*(b(x, e) for x, e in inputs)), b

    results, b = run(main())
    assert (b.batches, b.inline_batches, b.requests) == (1, 1, 3)
    for (x, e), got in zip(inputs, results, strict=True):
        torch.testing.assert_close(got, fragile(x, e))


class Clock:
    """A pass takes exactly as long as the function says: placement tests without sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_passes_move_inline_once_measured_and_long_ones_stay_on_the_thread() -> None:
    compute = ComputeThread()
    threads: list[str] = []
    clock = Clock()

    def taking(seconds: float):
        def fn(x: torch.Tensor) -> torch.Tensor:
            threads.append(threading.current_thread().name)
            clock.now += seconds
            return x + 1
        return fn

    async def main(fn) -> Batcher:
        b = Batcher(fn, (0,), max_size=64, max_wait_s=0.0, compute=compute, inline_max_s=0.01, clock=clock)
        for _ in range(3):
            assert float((await b(torch.zeros(1)))[0]) == 1.0
        return b

    b = run(main(taking(0.009)))
    assert threads[0].startswith("compute")  # nothing measured yet: the thread
    assert threads[1] == threads[2] == threading.current_thread().name and b.inline_batches == 2
    threads.clear()
    b = run(main(taking(0.011)))
    assert all(t.startswith("compute") for t in threads) and b.inline_batches == 0


def test_expected_pass_time_never_guesses_low() -> None:
    b = Batcher(lambda x: x, (0,), max_size=64, max_wait_s=0.0, compute=None)
    assert b.expected_seconds(8) is None
    b.pass_seconds = {1: 1e-4, 6: 5e-4}  # measured: 1 row, and 32-63 rows
    assert b.expected_seconds(1) == 1e-4
    assert b.expected_seconds(5) == 5e-4  # bounded by the larger passes
    assert b.expected_seconds(64) == pytest.approx(5e-4 * 64 / 32)  # scaled from the smallest count it covers


def test_timeout_fails_the_waiting_request_and_the_batcher_goes_on() -> None:
    compute = ComputeThread()

    def slow_once(x: torch.Tensor) -> torch.Tensor:
        if float(x[0]) < 0:
            time.sleep(0.2)
        return x

    async def main() -> torch.Tensor:
        b = Batcher(slow_once, (0,), max_size=1, max_wait_s=0.0, compute=compute, timeout_s=0.05)
        with pytest.raises(ComputeTimeout):
            await b(torch.full((1,), -1.0))
        b.timeout_s = 5.0
        return await b(torch.ones(1))

    assert float(run(main())[0]) == 1.0


def test_stage_runs_one_turns_calls_back_to_back_and_isolates_errors() -> None:
    runs: list[int] = []

    def double(v: int) -> int:
        if v < 0:
            raise ValueError("negative")
        return 2 * v

    async def main() -> list:
        stage = LoopTurnGroup(double)
        original = stage._run

        def counted() -> None:
            runs.append(len(stage.queue))
            original()

        stage._run = counted  # type: ignore[method-assign]
        return await asyncio.gather(stage(1), stage(-1), stage(3), return_exceptions=True)

    first, second, third = run(main())
    assert (first, third) == (2, 6) and isinstance(second, ValueError)
    assert runs == [3]  # one callback for the three calls


def test_a_pass_timed_on_the_compute_thread_counts_for_its_fewer_cores() -> None:
    compute = ComputeThread(inline_threads=2, compute_threads=1)
    clock = Clock()

    def slow(x: torch.Tensor) -> torch.Tensor:
        clock.now += 0.03
        return x

    async def main() -> Batcher:
        b = Batcher(slow, (0,), max_size=64, max_wait_s=0.0, compute=compute, inline_max_s=0.02, clock=clock)
        await b(torch.zeros(1))  # unknown: the compute thread; 30 ms there = 15 ms on two cores
        assert b.inline_batches == 0 and b.expected_seconds(1) == 0.015
        await b(torch.zeros(1))
        return b

    try:
        assert run(main()).inline_batches == 1
    finally:
        compute.shutdown()


def test_close_answers_every_queued_request_and_lets_the_running_pass_finish() -> None:
    compute = ComputeThread()
    started, release = threading.Event(), threading.Event()

    def blocking(x: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(5)
        return x

    async def main() -> None:
        b = Batcher(blocking, (0,), max_size=1, max_wait_s=0.0, compute=compute)
        running = asyncio.create_task(b(torch.zeros(1)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        queued = [asyncio.create_task(b(torch.ones(1))) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert b.queued_rows == 3 and not any(t.done() for t in queued)
        b.close()
        done, pending = await asyncio.wait(queued, timeout=1)
        assert not pending
        assert all(isinstance(t.exception(), Unavailable) for t in done)
        with pytest.raises(Unavailable) as closed:
            await b(torch.ones(1))  # after close: answered at once, never queued
        assert closed.value.detail == "the service is shutting down"
        release.set()
        assert float((await asyncio.wait_for(running, 5))[0]) == 0.0

    try:
        run(main())
    finally:
        compute.shutdown()


def test_every_failed_shared_pass_is_counted_and_each_caller_gets_its_own_error() -> None:
    bad = torch.full((1, 3), float("nan"))
    eps = torch.zeros(1, 1, 2)

    async def main() -> tuple[list, int]:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=0.0, compute=None)
        first = await asyncio.gather(b(bad, eps), b(bad, eps), return_exceptions=True)
        second = await asyncio.gather(b(bad, eps), b(bad, eps), b(bad, eps), return_exceptions=True)
        return first + second, b.isolated_batches

    out, isolated = run(main())
    assert isolated == 2  # two shared passes failed: each counted
    assert all(isinstance(e, ValueError) and str(e) == "NaN input" for e in out)


def test_a_cancelled_caller_does_not_keep_its_batch_mates_waiting() -> None:
    async def main() -> list:
        b = Batcher(lambda x: x * 3, (0,), max_size=64, max_wait_s=0.005, compute=None)
        tasks = [asyncio.create_task(b(torch.full((1,), float(i)))) for i in range(4)]
        await asyncio.sleep(0)
        tasks[0].cancel()  # gone before the pass ran: its result has nowhere to go
        _, pending = await asyncio.wait(tasks[1:], timeout=2)
        assert not pending
        return [float(t.result()[0]) for t in tasks[1:]]

    assert run(main()) == [3.0, 6.0, 9.0]


def test_a_cancelled_call_in_a_loop_turn_group_does_not_stop_the_rest() -> None:
    async def main() -> list:
        group = LoopTurnGroup(lambda x: x + 1)
        tasks = [asyncio.create_task(group(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[0].cancel()
        _, pending = await asyncio.wait(tasks[1:], timeout=2)
        assert not pending
        return [t.result() for t in tasks[1:]]

    assert run(main()) == [2, 3]


def test_without_an_inline_budget_every_pass_runs_on_the_compute_thread() -> None:
    compute = ComputeThread()
    threads: list[str] = []

    def where(x: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return x

    async def main() -> None:
        b = Batcher(where, (0,), max_size=4, max_wait_s=0.0, compute=compute)
        for _ in range(3):  # measured fast, but the default budget is zero: never on the event loop
            await b(torch.zeros(1))

    try:
        run(main())
    finally:
        compute.shutdown()
    assert len(threads) == 3 and all(name.startswith("compute") for name in threads)


class BrokenCompute:
    """A compute thread whose pass never runs: its future fails or is cancelled (an executor shut down
    under the batcher, a worker killed)."""

    inline_scale = 1.0

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome

    def submit(self, fn, *args) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.outcome == "cancel":
            future.cancel()
        else:
            future.set_exception(RuntimeError("the executor is gone"))
        return future


@pytest.mark.parametrize("outcome", ["fail", "cancel"])
def test_a_pass_that_never_ran_answers_every_caller_and_the_next_pass_still_runs(outcome: str) -> None:
    compute = BrokenCompute(outcome)

    async def main() -> tuple[list, Batcher]:
        b = Batcher(lambda x: x + 1, (0,), max_size=64, max_wait_s=0.0, compute=compute)
        got = await asyncio.gather(*(b(torch.zeros(n)) for n in (1, 2)), return_exceptions=True)
        compute.outcome = "cancel" if outcome == "fail" else "fail"
        got.append(*(await asyncio.gather(b(torch.zeros(1)), return_exceptions=True)))  # not stuck "busy"
        return got, b

    got, b = run(main())
    expected = RuntimeError if outcome == "fail" else asyncio.CancelledError
    assert [type(g) for g in got[:2]] == [expected, expected]
    assert isinstance(got[2], asyncio.CancelledError if outcome == "fail" else RuntimeError)
    assert str(got[0 if outcome == "fail" else 2]) == "the executor is gone"
    assert (b.busy, b.batches, len(b.queue)) == (False, 0, 0)  # nothing ran, so nothing is counted
