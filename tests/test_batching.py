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


def clocked(clock: Clock, seconds: float):
    """A model function whose every pass takes `seconds` on the fake clock."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        clock.now += seconds
        return x

    return fn


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

    async def main() -> Batcher:
        b = Batcher(clocked(clock, 0.03), (0,), max_size=64, max_wait_s=0.0, compute=compute, inline_max_s=0.02,
                    clock=clock)
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
        assert (len(b.queue), b.queued_rows) == (0, 0)
        done, pending = await asyncio.wait(queued, timeout=1)
        assert not pending
        assert all(isinstance(t.exception(), Unavailable) for t in done)
        assert {t.exception().detail for t in done} == {"the service is shutting down"}
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


# --- the compute thread ---------------------------------------------------------------------

def on_thread(compute: ComputeThread, fn):
    async def main():
        return await compute.submit(fn)
    return run(main())


def test_the_compute_thread_leaves_torchs_thread_count_alone_unless_told() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # what the service set (app/tuning.py); a new thread starts with it
    default, two = ComputeThread(), ComputeThread(inline_threads=4, compute_threads=2)
    try:
        assert on_thread(default, torch.get_num_threads) == 3
        assert on_thread(two, torch.get_num_threads) == 2
    finally:
        default.shutdown()
        two.shutdown()
        torch.set_num_threads(before)


@pytest.mark.parametrize(("inline", "compute", "scale"), [(0, 0, 1.0), (2, 1, 0.5), (4, 2, 0.5), (0, 2, 1.0),
                                                          (2, 0, 1.0)])
def test_a_compute_thread_pass_is_scaled_only_when_both_thread_counts_are_set(inline: int, compute: int,
                                                                               scale: float) -> None:
    thread = ComputeThread(inline_threads=inline, compute_threads=compute)
    thread.shutdown()
    assert thread.inline_scale == scale


def test_the_compute_thread_runs_one_pass_at_a_time_and_shutdown_waits_for_it() -> None:
    compute = ComputeThread()
    first_in, release, second_in, first_out = (threading.Event() for _ in range(4))

    def first() -> None:
        first_in.set()
        release.wait(5)
        first_out.set()

    async def main() -> None:
        a = compute.submit(first)
        b = compute.submit(second_in.set)
        await asyncio.to_thread(first_in.wait, 5)
        await asyncio.sleep(0.05)
        assert not second_in.is_set()  # one worker: the second pass waits for the first
        release.set()
        await asyncio.gather(a, b)

    run(main())
    assert second_in.is_set()
    first_in.clear()
    first_out.clear()
    release.clear()
    compute.executor.submit(first)
    first_in.wait(5)
    threading.Timer(0.05, release.set).start()
    compute.shutdown()
    assert first_out.is_set()  # shutdown returned only after the running pass did


# --- when a pass starts -------------------------------------------------------------------

def recording_timers(loop: asyncio.AbstractEventLoop) -> list[float]:
    """Every delay the batcher asks the loop for (call_later), in order."""
    delays: list[float] = []
    call_later = loop.call_later

    def recorded(delay, callback, *args, **kwargs):
        delays.append(delay)
        return call_later(delay, callback, *args, **kwargs)

    loop.call_later = recorded  # type: ignore[method-assign]
    return delays


def test_without_max_wait_no_pass_ever_waits_on_a_timer() -> None:
    async def main() -> tuple[list, list[float], Batcher]:
        delays = recording_timers(asyncio.get_running_loop())
        b = Batcher(lambda x: x + 1, (0,), max_size=1, max_wait_s=0.0, compute=None)
        out = await asyncio.gather(*(b(torch.full((1,), float(i))) for i in range(3)))
        return [float(o[0]) for o in out], delays, b

    out, delays, b = run(main())
    assert out == [1.0, 2.0, 3.0] and b.batches == 3
    assert delays == []  # max_size=1 leaves two queued after each inline pass: they go on at once


def test_a_lone_call_waits_max_wait_and_a_full_batch_starts_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        delays = recording_timers(loop)
        b = Batcher(lambda x: x + 1, (0,), max_size=2, max_wait_s=0.5, compute=None)
        first = asyncio.create_task(b(torch.zeros(1)))
        await asyncio.sleep(0)
        assert delays == [0.5] and isinstance(b.drain_handle, asyncio.TimerHandle)
        second = asyncio.create_task(b(torch.ones(1)))
        await asyncio.sleep(0)
        # max_size rows are queued: the timer is dropped and the pass starts on the next turn
        assert delays == [0.5] and type(b.drain_handle) is asyncio.Handle
        out = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert [float(o[0]) for o in out] == [1.0, 2.0] and b.batches == 1

    run(main())


def test_a_pass_measured_at_exactly_the_inline_budget_runs_inline() -> None:
    compute = ComputeThread()
    clock = Clock()

    async def main() -> Batcher:
        b = Batcher(clocked(clock, 0.25), (0,), max_size=8, max_wait_s=0.0, compute=compute, inline_max_s=0.0,
                    clock=clock)
        await b(torch.zeros(1))
        b.inline_max_s = b.expected_seconds(1)
        await b(torch.zeros(1))
        return b

    try:
        b = run(main())
    finally:
        compute.shutdown()
    assert b.inline_max_s == 0.25 and b.inline_batches == 1


def test_the_pass_time_estimate_is_a_moving_average_per_size() -> None:
    clock = Clock()
    times = iter([1.0, 2.0, 4.0])

    def timed(x: torch.Tensor) -> torch.Tensor:
        clock.now += next(times)
        return x

    async def main() -> Batcher:
        b = Batcher(timed, (0,), max_size=8, max_wait_s=0.0, compute=None, clock=clock)
        for n in (1, 1, 4):
            await b(torch.zeros(n))
        return b

    b = run(main())
    assert b.pass_seconds == {1: 0.8 * 1.0 + 0.2 * 2.0, 3: 4.0}  # 1 row twice; 4 rows (bucket 3) once


def test_an_unmeasured_size_takes_the_smallest_larger_measurement() -> None:
    b = Batcher(lambda x: x, (0,), max_size=64, max_wait_s=0.0, compute=None)
    b.pass_seconds = {3: 0.5, 5: 0.7}  # 4-7 rows and 16-31 rows
    assert b.expected_seconds(1) == 0.5
    assert b.expected_seconds(8) == 0.7
    assert b.expected_seconds(64) == pytest.approx(0.7 * 64 / 16)


# --- requests that are gone ----------------------------------------------------------------

@pytest.mark.timeout(10, method="thread")  # a drain that never returns blocks the loop: fail, not log
def test_passes_of_only_cancelled_callers_are_skipped_and_the_batcher_goes_on() -> None:
    async def main() -> float:
        b = Batcher(lambda x: x + 1, (0,), max_size=1, max_wait_s=0.01, compute=None)
        lone = asyncio.create_task(b(torch.zeros(1)))
        await asyncio.sleep(0)
        lone.cancel()
        await asyncio.sleep(0.05)  # the drain finds only a cancelled call: nothing to run, and it returns
        assert b.batches == 0 and not b.queue
        tasks = [asyncio.create_task(b(torch.full((1,), float(i)))) for i in range(3)]
        await asyncio.sleep(0)
        tasks[0].cancel()
        tasks[1].cancel()  # max_size=1: two passes in a row with nobody to answer, then the third
        return float((await asyncio.wait_for(tasks[2], 5))[0])

    assert run(main()) == 3.0


def test_a_caller_that_leaves_during_its_pass_does_not_keep_the_others_waiting() -> None:
    compute = ComputeThread()
    started, release = threading.Event(), threading.Event()

    def blocking(x: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(5)
        return x * 10

    async def main() -> list[float]:
        b = Batcher(blocking, (0,), max_size=8, max_wait_s=0.01, compute=compute)
        tasks = [asyncio.create_task(b(torch.full((1,), float(i)))) for i in range(3)]
        await asyncio.to_thread(started.wait, 5)
        tasks[0].cancel()  # its row is in the running pass
        release.set()
        _, pending = await asyncio.wait(tasks[1:], timeout=5)
        assert not pending and b.batches == 1
        return [float(t.result()[0]) for t in tasks[1:]]

    try:
        assert run(main()) == [10.0, 20.0]
    finally:
        compute.shutdown()


@pytest.mark.parametrize("on_thread", [False, True])
def test_a_lone_failing_request_gets_its_own_error(on_thread: bool) -> None:
    compute = ComputeThread() if on_thread else None

    async def main() -> BaseException | None:
        b = Batcher(fragile, (0, 1), max_size=8, max_wait_s=0.0, compute=compute)
        (got,) = await asyncio.wait_for(
            asyncio.gather(b(torch.full((1, 3), float("nan")), torch.zeros(1, 1, 2)), return_exceptions=True), 5)
        return got

    try:
        got = run(main())
    finally:
        if compute:
            compute.shutdown()
    assert isinstance(got, ValueError) and str(got) == "NaN input"
