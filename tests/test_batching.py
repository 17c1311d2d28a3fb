"""Dynamic batching gives each caller exactly what an unbatched call would."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.batching import Batcher


def fragile(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Fails the whole call if any row is NaN, like a model that cannot take a bad input."""
    if bool(torch.isnan(x).any()):
        raise ValueError("NaN input")
    return (x * 2).sum(-1) + eps.sum(0).sum(-1)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("max_wait_s", [0.0, 0.01])
def test_concurrent_calls_share_a_pass_and_match_unbatched(max_wait_s: float) -> None:
    executor = ThreadPoolExecutor(1)
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(n, 3, generator=gen), torch.randn(4, n, 2, generator=gen)) for n in (1, 2, 1, 3)]

    async def main() -> tuple[list[torch.Tensor], Batcher]:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=max_wait_s, executor=executor)
        out = await asyncio.gather(*(b(x, e) for x, e in inputs))
        b.close()
        return out, b

    results, batcher = run(main())
    assert batcher.requests == 4 and batcher.batches == 1
    for (x, e), got in zip(inputs, results, strict=True):
        torch.testing.assert_close(got, fragile(x, e))


def test_max_size_splits_passes() -> None:
    executor = ThreadPoolExecutor(1)

    async def main() -> Batcher:
        b = Batcher(lambda x: x + 1, (0,), max_size=4, max_wait_s=0.0, executor=executor)
        outs = await asyncio.gather(*(b(torch.full((3, 1), float(i))) for i in range(4)))
        for i, o in enumerate(outs):
            assert o.shape == (3, 1) and float(o[0, 0]) == i + 1
        b.close()
        return b

    b = run(main())
    assert b.batches == 4  # 3 + 3 > 4: every request ran alone


def test_one_bad_request_does_not_fail_its_neighbours() -> None:
    executor = ThreadPoolExecutor(1)
    good = torch.ones(2, 3)
    bad = torch.full((1, 3), float("nan"))
    eps = torch.zeros(1, 2, 2)

    async def main() -> list:
        b = Batcher(fragile, (0, 1), max_size=64, max_wait_s=0.0, executor=executor)
        out = await asyncio.gather(b(good, eps), b(bad, eps[:, :1]), b(good, eps), return_exceptions=True)
        b.close()
        return out

    first, second, third = run(main())
    torch.testing.assert_close(first, torch.full((2,), 6.0))
    assert isinstance(second, ValueError)
    torch.testing.assert_close(third, torch.full((2,), 6.0))
