"""The work behind each endpoint, as plain async functions over one served model.

Randomness is owned here, per request (a seeded torch.Generator on the CPU), and
passed into the artifact as explicit noise: a seed gives the same answer whether
the request was batched with others or not.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from app.batching import Batcher, ComputeThread
from app.models import ServedModel


class Engine:
    """A served model plus one batcher per method."""

    def __init__(self, model: ServedModel, compute: ComputeThread | None, max_size: int, max_wait_s: float,
                 timeout_s: float | None = None, inline_max_s: float = 0.0) -> None:
        self.model = model
        m = model.module

        def batcher(fn: Any, dims: tuple[int, ...]) -> Batcher:
            return Batcher(fn, dims, max_size, max_wait_s, compute, timeout_s, inline_max_s)

        self.encode = batcher(self._on_device(m.encode), (0,))
        self.decode = batcher(self._on_device(m.decode), (0,))
        self.forward = batcher(self._on_device(m.forward), (0,))
        # One batcher per k: only requests with the same number of samples can share a pass.
        self._ll: dict[int, Batcher] = {}
        self._ll_fn = self._on_device(m.log_likelihood_with_noise)
        self._make = batcher

    def log_likelihood(self, k: int) -> Batcher:
        if k not in self._ll:
            self._ll[k] = self._make(self._ll_fn, (0, 1))
        return self._ll[k]

    def batchers(self) -> dict[str, Batcher]:
        named = {"encode": self.encode, "decode": self.decode, "forward": self.forward}
        named.update({f"log_likelihood_k{k}": b for k, b in sorted(self._ll.items())})
        return named

    def stats(self) -> dict[str, dict[str, int]]:
        """How much batching happened, per method: requests served, passes run, passes run inline."""
        return {name: {"requests": b.requests, "passes": b.batches, "inline_passes": b.inline_batches}
                for name, b in self.batchers().items() if b.requests}

    def close(self) -> None:
        for b in self.batchers().values():
            b.close()

    def _on_device(self, fn: Any) -> Any:
        device = self.model.device
        if device.type == "cpu":  # no copies to make; each no-op .to()/.cpu() is still a dispatcher call
            return torch.no_grad()(fn)

        @torch.no_grad()
        def run(*args: Tensor) -> Any:
            out = fn(*(a.to(device, non_blocking=True) for a in args))
            if isinstance(out, tuple):
                return tuple(o.cpu() for o in out)
            return out.cpu()

        return run


def new_seed() -> int:
    return secrets.randbits(63)


async def encode(engine: Engine, x: Tensor) -> tuple[Tensor, Tensor]:
    mu, logvar = await engine.encode(x)
    return mu, logvar


async def decode(engine: Engine, z: Tensor) -> Tensor:
    return await engine.decode(z)


async def sample(engine: Engine, n: int, seed: int, temperature: float) -> tuple[Tensor, Tensor]:
    """n images from z ~ N(0, T^2 I); the same seed gives the same z on every machine."""
    z = torch.randn(n, engine.model.latent_dim, generator=torch.Generator().manual_seed(seed)) * temperature
    return z, await engine.decode(z)


async def reconstruct(engine: Engine, x: Tensor) -> Tensor:
    recon, _, _ = await engine.forward(x)  # eval mode: z = mu, deterministic
    return recon


@dataclass
class Score:
    score: float
    percentile: float | None
    is_anomaly: bool | None


async def anomaly_scores(engine: Engine, x: Tensor, k: int, seed: int, threshold: float | None) -> list[Score]:
    """-log p(x) bound in nats for each image, with its place in the calibration distribution.

    Every image of a request gets the same k noise draws (common random numbers): an
    image's score depends on the image and the seed only, not on its neighbours.
    """
    noise = torch.randn(k, 1, engine.model.latent_dim, generator=torch.Generator().manual_seed(seed))
    eps = noise.expand(k, x.shape[0], engine.model.latent_dim)
    ll = await engine.log_likelihood(k)(x, eps)
    out = []
    for value in (-ll).tolist():
        score = value if math.isfinite(value) else sys.float_info.max  # JSON has no infinity
        out.append(Score(score, engine.model.percentile(score), None if threshold is None else score > threshold))
    return out
