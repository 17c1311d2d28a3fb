"""The work behind each model endpoint: one Engine per served model, a method per capability.

The routes only translate HTTP; everything a request asks of a model, its limits
included, is checked and done here. Randomness is owned here too, per request (a
seeded torch.Generator on the CPU), and passed into the artifact as explicit noise: a
seed gives the same answer whether the request was batched with others or not.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from app.artifacts import ServedModel
from app.batching import Batcher, ComputeThread
from app.exceptions import BatchTooLarge, InvalidInput, TooManySamples, UnknownScoreMethod, WrongLatentSize
from app.metrics import Metrics
from app.settings import Settings


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (VAE_MAX_* settings)."""

    max_batch: int = 64
    max_samples: int = 256
    max_k: int = 1000
    default_k: int | None = None  # None: each model's calibration k
    default_threshold_percentile: float = 99.0

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_batch, s.max_samples, s.max_k, s.default_k, s.default_threshold_percentile)

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
        # One batcher per k: only requests with the same number of samples can share a pass.
        self._ll: dict[int, Batcher] = {}
        self._scores: dict[int, Batcher] = {}

    def _batcher(self, fn: Any, dims: tuple[int, ...], method: str, max_size: int | None = None) -> Batcher:
        b = self._batching
        observer = self._metrics.pass_observer(self.model.name, method) if self._metrics else None
        return Batcher(self._on_device(fn), dims, max_size or b.max_size, b.max_wait_s, self._compute, b.timeout_s,
                       b.inline_max_s, observer=observer)

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
        for i, row in enumerate(z):
            if len(row) != d:
                raise WrongLatentSize(f"z[{i}] has {len(row)} values; model {self.model.name!r} has latent_dim={d}")
        return await self._decode(torch.tensor(z, dtype=torch.float32))

    async def sample(self, n: int, seed: int | None, temperature: float) -> Sample:
        """n images from z ~ N(0, T² I); the same seed gives the same z on every machine."""
        if n > self.limits.max_samples:
            raise TooManySamples(f"n={n}; the limit is {self.limits.max_samples} (VAE_MAX_SAMPLES)")
        seed = new_seed() if seed is None else seed
        z = torch.randn(n, self.model.latent_dim, generator=torch.Generator().manual_seed(seed)) * temperature
        return Sample(seed, z, await self._decode(z))

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
        named = {"encode": self._encode, "decode": self._decode, "forward": self._forward}
        named.update({f"log_likelihood_k{k}": b for k, b in sorted(self._ll.items())})
        named.update({f"anomaly_scores_k{k}": b for k, b in sorted(self._scores.items())})
        return named

    def stats(self) -> dict[str, dict[str, int]]:
        """How much batching happened, per method: requests served, passes run, passes run inline, and
        batched passes that failed and were retried one request at a time (a bad input among good ones)."""
        return {name: {"requests": b.requests, "passes": b.batches, "inline_passes": b.inline_batches,
                       "isolated_passes": b.isolated_batches} for name, b in self.batchers().items() if b.requests}

    def close(self) -> None:
        for b in self.batchers().values():
            b.close()


def new_seed() -> int:
    return secrets.randbits(63)
