"""The work behind each model endpoint: one Engine per served model, a method per capability.

The routes only translate HTTP; everything a request asks of a model, its limits
included, is checked and done here. Randomness is owned here too, per request (a
seeded torch.Generator on the CPU), and passed into the artifact as explicit noise: a
seed gives the same answer whether the request was batched with others or not.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from app.artifacts import ServedModel
from app.batching import Batcher, ComputeThread
from app.exceptions import (
    BatchTooLarge,
    InvalidInput,
    NotCarried,
    TooManySamples,
    UnknownScoreMethod,
    WrongLatentSize,
)
from app.metrics import Metrics
from app.neighbours import Neighbours
from app.settings import Settings


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (VAE_MAX_* settings)."""

    max_batch: int = 64
    max_samples: int = 256
    max_k: int = 1000
    default_k: int | None = None  # None: each model's calibration k
    default_threshold_percentile: float = 99.0
    max_neighbours: int = 100

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_batch, s.max_samples, s.max_k, s.default_k, s.default_threshold_percentile,
                   s.max_neighbours)

    def check_batch(self, n: int, what: str = "images") -> None:
        if n > self.max_batch:
            raise BatchTooLarge(f"{n} {what}; the limit is {self.max_batch} (VAE_MAX_BATCH)")


@dataclass
class Batching:
    """How concurrent calls are gathered into forward passes (VAE_BATCH_*, VAE_INLINE_MAX_US)."""

    max_size: int = 64
    max_wait_s: float = 0.0
    timeout_s: float | None = None
    inline_max_s: float = 0.0
    max_samples: int = 1024  # images x importance samples in one anomaly-score pass

    @classmethod
    def from_settings(cls, s: Settings) -> Batching:
        return cls(s.batch_max_size, s.batch_max_wait_us / 1e6, s.request_timeout_s, s.inline_max_us / 1e6,
                   s.batch_max_samples)


@dataclass
class Sample:
    seed: int
    z: Tensor
    images: Tensor


@dataclass
class Score:
    score: float
    percentile: float | None
    is_anomaly: bool | None


@dataclass
class Scores:
    method: str
    k: int
    threshold: float | None
    threshold_percentile: float
    calibration_k: int | None
    results: list[Score]


class Engine:
    """A served model, one batcher per method, and the limits its requests are held to."""

    def __init__(self, model: ServedModel, compute: ComputeThread | None, batching: Batching | None = None,
                 limits: Limits | None = None, metrics: Metrics | None = None) -> None:
        self.model, self.limits = model, limits or Limits()
        self._batching = batching or Batching()
        self._compute = compute
        self._metrics = metrics
        m = model.module
        self._encode = self._batcher(m.encode, (0,), "encode")
        self._decode = self._batcher(m.decode, (0,), "decode")
        self._forward = self._batcher(m.forward, (0,), "forward")
        self._nearest = self._batcher(self._encode_and_search, (0,), "similar") if model.index is not None else None
        # One batcher per k: only requests with the same number of samples can share a pass.
        self._ll: dict[int, Batcher] = {}
        self._scores: dict[int, Batcher] = {}

    def _batcher(self, fn: Any, dims: tuple[int, ...], method: str, max_size: int | None = None) -> Batcher:
        b = self._batching
        observer = self._metrics.pass_observer(self.model.name, method) if self._metrics else None
        return Batcher(self._on_device(fn), dims, max_size or b.max_size, b.max_wait_s, self._compute, b.timeout_s,
                       b.inline_max_s, observer=observer, name=method)

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

    def score_rows(self, k: int) -> int:
        """Images per anomaly-score pass at k samples: each costs k passes of the networks, so a pass
        holds at most VAE_BATCH_MAX_SAMPLES images x k. A larger request runs as several passes, one
        after another, and other requests' passes run between them: the largest legal request (64
        images at k=1000) no longer holds a one-image score for seconds."""
        return max(1, min(self._batching.max_size, self._batching.max_samples // k))

    def _log_likelihood(self, k: int) -> Batcher:
        if k not in self._ll:
            self._ll[k] = self._batcher(self.model.module.log_likelihood_with_noise, (0, 1), "log_likelihood",
                                        self.score_rows(k))
        return self._ll[k]

    def _anomaly_scores(self, k: int) -> Batcher:
        if k not in self._scores:
            self._scores[k] = self._batcher(self.model.module.anomaly_scores_with_noise, (0, 1), "anomaly_scores",
                                            self.score_rows(k))
        return self._scores[k]

    async def _in_turns(self, batcher: Batcher, x: Tensor, noise: Tensor, k: int) -> Tensor:
        """`batcher(x, noise)` over slices of score_rows(k) images, each awaited before the next is queued,
        so that a request arriving meanwhile is queued before this one's next slice."""
        rows = self.score_rows(k)
        if x.shape[0] <= rows:
            return await batcher(x, noise)
        return torch.cat([await batcher(x[i:i + rows], noise[:, i:i + rows]) for i in range(0, x.shape[0], rows)])

    # --- the capabilities -----------------------------------------------------------------

    async def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B,1,28,28] -> the posterior's (mu, logvar), each [B, latent_dim]."""
        return await self._encode(x)

    async def decode(self, z: list[list[float]] | Tensor) -> Tensor:
        """Latent vectors (already finite and bounded by the request's schema) -> images [B,1,28,28]."""
        self.limits.check_batch(len(z), "vectors")
        d = self.model.latent_dim
        if isinstance(z, Tensor):
            if z.ndim != 2 or z.shape[1] != d:
                raise WrongLatentSize(f"z has shape {list(z.shape)}; model {self.model.name!r} takes [n, {d}]")
            return await self._decode(z.float())
        return await self._decode(self._latents(z))

    async def sample(self, n: int, seed: int | None, temperature: float | None = None,
                     digit: int | None = None) -> Sample:
        """n images from z ~ N(0, T² I), or with `digit` from that digit's Gaussian N(m, T² LLᵀ) in the
        artifact (`digit_gaussians`); the same seed gives the same z on every machine. T defaults to 1, and
        to DIGIT_TEMPERATURE for a digit."""
        if n > self.limits.max_samples:
            raise TooManySamples(f"n={n}; the limit is {self.limits.max_samples} (VAE_MAX_SAMPLES)")
        seed = new_seed() if seed is None else seed
        if temperature is None:
            temperature = 1.0 if digit is None else DIGIT_TEMPERATURE
        z = torch.randn(n, self.model.latent_dim, generator=torch.Generator().manual_seed(seed)) * temperature
        if digit is not None:
            if self.model.digits is None:
                raise NotCarried(f"model {self.model.name!r} carries no per-digit latent Gaussians (an artifact "
                                 "with the fitted anomaly score does: vae-fit-score); sample without digit=")
            means, trils = self.model.digits
            z = means[digit] + z @ trils[digit].T
        return Sample(seed, z, await self._decode(z))

    async def interpolate(self, ends: Tensor | list[list[float]], steps: int, path: str) -> tuple[Tensor, Tensor]:
        """The decoded path between two images' posterior means (`ends`: [2,1,28,28]) or two latent
        vectors: `steps` points, the first and last being the two ends (for images: their reconstructions)."""
        if steps > self.limits.max_samples:
            raise TooManySamples(f"steps={steps}; the limit is {self.limits.max_samples} (VAE_MAX_SAMPLES)")
        if isinstance(ends, Tensor):
            if ends.shape[0] != 2:
                raise InvalidInput(f"send exactly two images to interpolate between; got {ends.shape[0]}")
            z_ends = (await self._encode(ends))[0].float()
        else:
            if len(ends) != 2:
                raise InvalidInput(f"send exactly two latent vectors in z; got {len(ends)}")
            z_ends = self._latents(ends)
        z = path_between(z_ends[0], z_ends[1], steps, path)
        return z, await self._decode(z)

    async def similar(self, x: Tensor, k: int) -> Neighbours:
        """The k MNIST training digits nearest to each image's posterior mean (the artifact's index)."""
        if self._nearest is None:
            raise NotCarried(f"model {self.model.name!r} carries no neighbour index (add one: vae-index "
                             f"{self.model.path.name})")
        if k > self.limits.max_neighbours:
            raise InvalidInput(f"k={k}; the limit is {self.limits.max_neighbours} (VAE_MAX_NEIGHBOURS)",
                               error="k too large")
        index, distance = await self._nearest(x)
        return Neighbours(index[:, :k], distance[:, :k])

    def _encode_and_search(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One pass for a batch of /similar requests: encode, then search for as many neighbours as any
        request may ask for (each takes its k)."""
        assert self.model.index is not None
        found = self.model.index.search(self.model.module.encode(x)[0], self.limits.max_neighbours)
        return found.index, found.distance

    def _latents(self, z: list[list[float]]) -> Tensor:
        d = self.model.latent_dim
        for i, row in enumerate(z):
            if len(row) != d:
                raise WrongLatentSize(f"z[{i}] has {len(row)} values; model {self.model.name!r} has latent_dim={d}")
        return torch.tensor(z, dtype=torch.float32)

    async def reconstruct(self, x: Tensor) -> Tensor:
        recon, _, _ = await self._forward(x)  # eval mode: z = mu, deterministic
        return recon

    async def anomaly_scores(self, x: Tensor, k: int | None, seed: int, threshold_percentile: float | None,
                             method: str | None = None) -> Scores:
        """Each image's anomaly score (higher = less like the training digits) by `method` (default: the
        artifact's), with its place in that method's calibration distribution.

        Every image of a request gets the same k noise draws (common random numbers): an
        image's score depends on the image and the seed only, not on its neighbours.
        """
        name = method or self.model.default_score
        if name not in self.model.scores:
            raise UnknownScoreMethod(f"{name!r}; model {self.model.name!r} serves {sorted(self.model.scores)}")
        scorer = self.model.scores[name]
        k = k or self.limits.default_k or scorer.default_k
        if k > self.limits.max_k:
            raise InvalidInput(f"k={k}; the limit is {self.limits.max_k} (VAE_MAX_K)", error="k too large")
        pct = threshold_percentile or self.limits.default_threshold_percentile
        threshold = scorer.threshold(pct)
        d = self.model.latent_dim
        noise = torch.randn(k, 1, d, generator=torch.Generator().manual_seed(seed)).expand(k, x.shape[0], d)
        if scorer.column is None:
            values = (-await self._in_turns(self._log_likelihood(k), x, noise, k)).tolist()
        else:
            values = (await self._in_turns(self._anomaly_scores(k), x, noise, k))[:, scorer.column].tolist()
        results = []
        for value in values:
            score = value if math.isfinite(value) else sys.float_info.max  # JSON has no infinity
            flagged = None if threshold is None else score > threshold
            results.append(Score(score, scorer.percentile(score), flagged))
        return Scores(name, k, threshold, pct, scorer.k, results)

    # --- operations -----------------------------------------------------------------------

    def batchers(self) -> dict[str, Batcher]:
        named = {"encode": self._encode, "decode": self._decode, "forward": self._forward,
                 **({"similar": self._nearest} if self._nearest is not None else {})}
        named.update({f"log_likelihood_k{k}": b for k, b in sorted(self._ll.items())})
        named.update({f"anomaly_scores_k{k}": b for k, b in sorted(self._scores.items())})
        return named

    def stats(self) -> dict[str, dict[str, int]]:
        """How much batching happened, per method: requests served, passes run, passes run inline, and
        batched passes that failed and were retried one request at a time (a bad input among good ones)."""
        return {name: {"requests": b.requests, "passes": b.batches, "inline_passes": b.inline_batches,
                       "isolated_passes": b.isolated_batches} for name, b in self.batchers().items() if b.requests}

    @property
    def active(self) -> int:
        """Calls waiting for or in a forward pass. An engine taken out of service is never closed under
        its callers (app/repository.py), so a request between two passes loses nothing either."""
        return sum(len(b.queue) + b.busy for b in self.batchers().values())

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no call waits for or is in a forward pass (at most timeout_s); False if some still do."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.active

    def close(self) -> None:
        for b in self.batchers().values():
            b.close()


# A digit's Gaussian is fitted to its training digits' posterior means, but those lie in a curved cluster
# that no Gaussian follows closely: at T = 1, 82% of `vae`'s sampled 8s are 8s to its digit head (78% to a
# 1-NN on MNIST's pixels), at 0.8 every digit's samples are named as that digit 93-100% of the time
# (python -m bench.latent_space; docs/performance.md#samples-of-a-chosen-digit).
DIGIT_TEMPERATURE = 0.8


def new_seed() -> int:
    return secrets.randbits(63)


def path_between(a: Tensor, b: Tensor, steps: int, path: str) -> Tensor:
    """`steps` points from a to b [D], both included: evenly spaced on the line, or on the great-circle
    arc (slerp, Shoemake 1985; for latent spaces, White 2016). In many dimensions codes lie in a shell
    away from the origin (under N(0, I) almost all mass is near radius sqrt(D)): a straight line between
    two of them cuts inside it, where the decoder saw few codes, while the arc keeps the norm between the
    ends' (docs/api.md has a picture). Two points at an angle too small (or too close to opposite) for
    the arc to be well defined get the line."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    if path == "slerp" and na > 0 and nb > 0:
        omega = torch.arccos((a64 @ b64 / (na * nb)).clamp(-1, 1))
        if 1e-6 < float(torch.sin(omega)):
            so = torch.sin(omega)
            return (torch.sin((1 - t) * omega) / so * a64 + torch.sin(t * omega) / so * b64).float()
    return ((1 - t) * a64 + t * b64).float()
