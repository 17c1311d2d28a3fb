"""The VAE models and the loss.

Every architecture exposes the artifact contract directly (encode, decode, forward,
log_likelihood), so the module that is trained is the module that is scripted and
served: there is no second implementation to drift.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# TorchScript is deprecated upstream in favour of torch.export, but it is still the one
# format that carries several methods (encode/decode/log_likelihood) in one file.
warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)


class VAEBase(nn.Module):
    """Shared contract. Subclasses supply `encode` and `decode_logits`."""

    latent_dim: torch.jit.Final[int]

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        """[B, D] -> Bernoulli means [B, 1, 28, 28] in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z)).reshape(-1, 1, 28, 28)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        # Sampling only while training: a served reconstruction should be deterministic.
        if self.training:
            std = torch.exp(0.5 * logvar)
            return mu + torch.randn_like(std) * std
        return mu

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.jit.export
    def log_likelihood(self, x: Tensor, k: int) -> Tensor:
        """Importance-weighted lower bound on log p(x) in nats, one value per image.

        k=1 is the ELBO with the analytic KL (the reference loss, negated); k>1 is the
        IWAE bound. Continuous pixels are scored by the Bernoulli cross-entropy.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        eps = torch.randn(k, x.shape[0], self.latent_dim, dtype=x.dtype, device=x.device)
        return self.log_likelihood_with_noise(x, eps)

    @torch.jit.export
    def log_likelihood_with_noise(self, x: Tensor, eps: Tensor) -> Tensor:
        """`log_likelihood` with the standard-normal noise given, eps: [k, B, D].

        Callers that own the randomness (the service's per-request seeds, dynamic
        batching) get the same numbers whatever batch an image is scored in. Samples
        are decoded in chunks so memory stays bounded for k=1000.
        """
        mu, logvar = self.encode(x)
        return self.importance_weighted(x, mu, logvar, eps)

    def importance_weighted(self, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
        """The bound from a posterior already computed: a caller that also needs the posterior mean
        (the fitted anomaly score) encodes once."""
        target = x.reshape(-1, 784)
        k, batch = eps.shape[0], eps.shape[1]
        std = torch.exp(0.5 * logvar)
        if k == 1:
            z = mu + eps[0] * std
            rec = -F.binary_cross_entropy_with_logits(self.decode_logits(z), target, reduction="none").sum(-1)
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
            return rec - kld
        chunk = max(1, 8192 // max(batch, 1))
        log_weights: list[Tensor] = []
        log_q_const = -0.5 * (logvar + math.log(2.0 * math.pi)).sum(-1)  # [B]
        for start in range(0, k, chunk):
            e = eps[start : start + chunk]
            n = e.shape[0]
            z = mu + e * std  # [n, B, D]
            logits = self.decode_logits(z.reshape(n * batch, self.latent_dim)).reshape(n, batch, 784)
            log_px_z = -F.binary_cross_entropy_with_logits(
                logits, target.expand(n, batch, 784), reduction="none"
            ).sum(-1)
            log_pz = -0.5 * (z.pow(2) + math.log(2.0 * math.pi)).sum(-1)
            log_qz = log_q_const - 0.5 * e.pow(2).sum(-1)
            log_weights.append(log_px_z + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_weights, 0), dim=0) - math.log(k)


class VAE(VAEBase):
    """The reference model of pytorch/examples vae/main.py, layer for layer."""

    def __init__(self, latent_dim: int = 20, hidden: int = 400) -> None:
        super().__init__(latent_dim)
        self.fc1 = nn.Linear(784, hidden)
        self.fc_mu = nn.Linear(hidden, latent_dim)
        self.fc_logvar = nn.Linear(hidden, latent_dim)
        self.fc2 = nn.Linear(latent_dim, hidden)
        self.fc3 = nn.Linear(hidden, 784)

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x.reshape(-1, 784)))
        return self.fc_mu(h1), self.fc_logvar(h1)

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(z)))


class DeepVAE(VAEBase):
    """Two hidden layers each side: the stronger model within a 2-core CPU's budget."""

    def __init__(self, latent_dim: int = 32, hidden: int = 512) -> None:
        super().__init__(latent_dim)
        self.encoder = nn.Sequential(
            nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.fc_mu = nn.Linear(hidden, latent_dim)
        self.fc_logvar = nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 784),
        )

    @torch.jit.export
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x.reshape(-1, 784))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(z)


ARCHS: dict[str, type[VAEBase]] = {"mlp": VAE, "deep": DeepVAE}


def build(arch: str, latent_dim: int, hidden: int) -> VAEBase:
    return ARCHS[arch](latent_dim=latent_dim, hidden=hidden)


def loss_function(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Reconstruction + KL divergence summed over the batch: the reference loss, verbatim."""
    bce = F.binary_cross_entropy(recon_x.reshape(-1, 784), x.reshape(-1, 784), reduction="sum")
    # see Appendix B from VAE paper: Kingma and Welling. Auto-Encoding Variational Bayes. ICLR, 2014
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld
