"""Pictures of a trained model: people would rather look at a latent space than read about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and in CI
import matplotlib.pyplot as plt
import torch
from torch import Tensor
from torchvision.utils import save_image


@torch.no_grad()
def latent_scatter(mu: Tensor, labels: Tensor, path: Path, name: str) -> None:
    """Test-set means coloured by digit; latents above 2-D are projected on their first two principal axes."""
    if mu.shape[1] == 2:
        xy, title = mu, f"{name}: 2-D latent space of the MNIST test set"
    else:
        centred = mu - mu.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ v[:2].T
        title = f"{name}: first two PCA components of the {mu.shape[1]}-D latent means"
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    cmap = plt.get_cmap("tab10")
    for digit in range(10):
        sel = labels == digit
        ax.scatter(xy[sel, 0], xy[sel, 1], s=2, alpha=0.6, color=cmap(digit), label=str(digit), rasterized=True)
    ax.legend(title="digit", markerscale=6, loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("z[0]" if mu.shape[1] == 2 else "PC 1")
    ax.set_ylabel("z[1]" if mu.shape[1] == 2 else "PC 2")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def manifold(model: Any, path: Path, n: int = 20) -> None:
    """Decoded images over an n x n grid of standard-normal quantiles (2-D models only)."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    # Row index runs top to bottom, so flip z[1] to put larger values at the top like a plot axis.
    z = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
    device = next(iter(model.parameters())).device
    save_image(model.decode(z.to(device)).cpu(), path, nrow=n, padding=1)


@torch.no_grad()
def samples(model: Any, latent_dim: int, path: Path, n: int = 64, seed: int = 0) -> None:
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(iter(model.parameters())).device
    save_image(model.decode(z.to(device)).cpu(), path, nrow=8, padding=2)


@torch.no_grad()
def reconstructions(model: Any, x: Tensor, path: Path, n: int = 16) -> None:
    """Originals in the top row, their (deterministic, z = mu) reconstructions underneath."""
    device = next(iter(model.parameters())).device
    x = x[:n].to(device)
    mu, _ = model.encode(x)
    save_image(torch.cat([x, model.decode(mu)]).cpu(), path, nrow=n, padding=2)


def loss_curves(history: list[dict[str, Any]], path: Path, name: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per data point (nats)")
    ax.set_title(f"{name}: training objective per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
