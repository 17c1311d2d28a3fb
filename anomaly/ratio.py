"""The `ratio` statistic of the fitted anomaly score: how much better a model of *characters* explains an
image than a model of *digits* does.

Why: a VAE's likelihood rewards simple shapes whatever they are (Nalisnick et al. 2019), so a pentagon
or a hooked letter drawn with a pen is as likely as a digit. Dividing by the likelihood under a
general-domain model cancels what the two share (thin strokes on black, few of them, fitted into a
box) and leaves the shape: Schirrmeister et al. (2020) with a general model of natural images, Ren et
al. (2019) with a background model. Here both are the served VAE's architecture, trained from scratch:

- `digits`: MNIST training digits and digits printed in fonts (anomaly/glyph_pool.py), so that a
  printed 7 is a digit to it and the font's crisp edges do not count as evidence against a digit;
- `glyphs`: letters of 48 scripts the OOD suite does not use, printed the same way.

The statistic is -log p_digits(x) + log p_glyphs(x), each the IWAE bound with a fixed noise draw
stored in the module (so it is the same batched or alone, and needs none of the served VAE's latent
size). Nothing here is fitted to any set of the suite; docs/benchmarks.md#anomaly-detection has what
it does there.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from anomaly.glyph_pool import OTHER_SCRIPTS, other_script_glyphs, printed_digits
from training.data import binarize
from training.model import DeepVAE, VAEBase, loss_function

LATENT, HIDDEN = 32, 512  # the shipped `vae`'s architecture
K = 16  # importance samples per image for each of the two bounds (64 measured: no better)


class GlyphRatio(nn.Module):
    """-log p_digits(x) + log p_glyphs(x), nats: large where characters explain the image better than digits."""

    def __init__(self, digits: VAEBase, glyphs: VAEBase, k: int = K, seed: int = 0) -> None:
        super().__init__()
        if digits.latent_dim != glyphs.latent_dim:
            raise ValueError("the two models must share a latent size (one noise draw serves both)")
        self.digits, self.glyphs = digits.eval(), glyphs.eval()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("noise", torch.randn(k, 1, digits.latent_dim, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        eps = self.noise.expand(self.noise.shape[0], x.shape[0], self.noise.shape[2])
        return self.glyphs.log_likelihood_with_noise(x, eps) - self.digits.log_likelihood_with_noise(x, eps)


def train_density(x: Tensor, epochs: int, seed: int, name: str, batch_size: int = 128, progress: bool = True,
                  device: str | torch.device = "cpu") -> VAEBase:
    """A `DeepVAE` trained on x ([N, 1, 28, 28] in [0, 1]) with the reference loss, dynamically binarised,
    Adam with a cosine schedule: the shipped `vae`'s recipe at k=1 (the importance-weighted objective
    costs 3x and the ratio did not need it)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DeepVAE(LATENT, HIDDEN).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(x.shape[0] / batch_size)))
    for epoch in range(1, epochs + 1):
        model.train()
        perm, total, t0 = torch.randperm(x.shape[0], generator=g), 0.0, time.perf_counter()
        steps = range(0, x.shape[0], batch_size)
        for i in tqdm(steps, desc=f"{name} model, epoch {epoch}/{epochs}", disable=not progress, leave=False):
            xb = binarize(x[perm[i : i + batch_size]], g).to(device)
            recon, mu, logvar = model(xb)
            loss = loss_function(recon, xb, mu, logvar)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"{name} model epoch {epoch}: loss {total / x.shape[0]:.2f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    return model.cpu().eval()


def fit_ratio(digits_x: Tensor, epochs: int, glyphs: int, printed: int, seed: int = 0, k: int = K,
              progress: bool = True, device: str | torch.device = "cpu") -> tuple[GlyphRatio, dict[str, Any]]:
    """Both models, from `digits_x` (MNIST training digits the tails' reference images are not among) plus
    `printed` printed digits, and `glyphs` letters of other scripts; and meta.json's record of it."""
    def images(a: Any) -> Tensor:
        return torch.from_numpy(a).float().div(255).reshape(-1, 1, 28, 28)

    t0 = time.perf_counter()
    pool, printed_x = images(other_script_glyphs(glyphs, seed)), images(printed_digits(printed, seed))
    print(f"drew {glyphs} glyphs of {len(OTHER_SCRIPTS)} scripts and {printed} printed digits "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    digits = train_density(torch.cat([digits_x.reshape(-1, 1, 28, 28), printed_x]), epochs, seed, "digits",
                           progress=progress, device=device)
    other = train_density(pool, epochs, seed + 1, "glyphs", progress=progress, device=device)
    for p in [*digits.parameters(), *other.parameters()]:
        p.requires_grad_(False)
    record = {"digit_images": int(digits_x.shape[0]), "printed_digits": printed, "glyphs": glyphs,
              "scripts": len(OTHER_SCRIPTS), "epochs": epochs, "k": k, "device": torch.device(device).type}
    return GlyphRatio(digits, other, k, seed), record
