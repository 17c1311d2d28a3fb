"""The training program's output honours the artifact contract the service relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_args
from training import export, train
from training.data import to_float
from training.model import VAE, loss_function


@pytest.fixture(scope="module")
def artifact(trained: Path) -> tuple[torch.jit.ScriptModule, dict]:
    return export.load(trained / "vae.pt")


@pytest.fixture(scope="module")
def batch(mnist) -> torch.Tensor:
    return to_float(mnist.test_images[:32])


def test_reference_architecture_is_layer_for_layer() -> None:
    m = VAE(latent_dim=20, hidden=400)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")}
    assert shapes == {"fc1.weight": (400, 784), "fc_mu.weight": (20, 400), "fc_logvar.weight": (20, 400),
                      "fc2.weight": (400, 20), "fc3.weight": (784, 400)}


@pytest.mark.parametrize("name", ["vae", "deep-tiny"])
def test_artifact_contract_shapes_and_ranges(trained: Path, batch: torch.Tensor, name: str) -> None:
    module, meta = export.load(trained / f"{name}.pt")
    d = meta["latent_dim"]
    mu, logvar = module.encode(batch)
    assert mu.shape == logvar.shape == (32, d)
    probs = module.decode(torch.randn(5, d)).detach()
    assert probs.shape == (5, 1, 28, 28)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1
    recon, mu2, _ = module.forward(batch)
    assert recon.shape == batch.shape and torch.allclose(mu, mu2)
    ll = module.log_likelihood(batch, 4).detach()
    assert ll.shape == (32,) and bool(torch.isfinite(ll).all()) and float(ll.max()) < 0
    for key in ("name", "arch", "latent_dim", "input_shape", "likelihood", "pixels", "config", "dataset", "metrics",
                "anomaly_calibration", "torch_version", "created"):
        assert key in meta, key
    assert meta["name"] == name and meta["input_shape"] == [1, 28, 28]
    quantiles = meta["anomaly_calibration"]["quantiles"]
    assert {"p50", "p90", "p95", "p99", "p99.9"} <= set(quantiles)
    values = list(quantiles.values())
    assert values == sorted(values)
    assert len(meta["dataset"]["sha256_uncompressed"]) == 4


def test_k1_bound_is_minus_the_reference_loss(artifact, batch: torch.Tensor) -> None:
    module, _ = artifact
    torch.manual_seed(123)
    ll = module.log_likelihood(batch, 1)
    torch.manual_seed(123)
    mu, logvar = module.encode(batch)
    std = torch.exp(0.5 * logvar)
    recon = module.decode(mu + torch.randn_like(std) * std)
    reference = torch.stack([loss_function(recon[i], batch[i], mu[i], logvar[i]) for i in range(32)])
    torch.testing.assert_close(ll, -reference, rtol=1e-5, atol=1e-3)


def test_more_importance_samples_tighten_the_bound(artifact, batch: torch.Tensor) -> None:
    module, _ = artifact
    torch.manual_seed(0)
    k1 = module.log_likelihood(batch, 1).mean()
    k16 = module.log_likelihood(batch, 16).mean()
    assert k16 >= k1


def test_given_noise_reproduces_log_likelihood(artifact, batch: torch.Tensor) -> None:
    module, meta = artifact
    torch.manual_seed(7)
    a = module.log_likelihood(batch, 8)
    torch.manual_seed(7)
    eps = torch.randn(8, 32, meta["latent_dim"])
    torch.testing.assert_close(a, module.log_likelihood_with_noise(batch, eps))


def test_metrics_json_records_losses_parity_and_evaluation(trained: Path) -> None:
    metrics = json.loads((trained / "vae.metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    epoch = metrics["epochs"][0]
    assert 0 < epoch["test_loss"] < 550 and epoch["seconds"] > 0
    assert metrics["export_parity_max_abs_diff"] <= 1e-5
    final = metrics["final"]
    assert final["nll_k"] == 16 and final["test_images"] == 500
    assert final["nll"] <= final["neg_elbo"] + 5  # IWAE bound is tighter than the ELBO, up to sampling noise
    assert metrics["torch_version"] == torch.__version__
    assert metrics["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("picture", "size"), [
    ("latent.png", (800, 700)),
    ("manifold.png", (20 * 29 + 1, 20 * 29 + 1)),
    ("samples.png", (8 * 30 + 2, 8 * 30 + 2)),
    ("reconstructions.png", (16 * 30 + 2, 2 * 30 + 2)),
    ("loss.png", (700, 450)),
])
def test_pictures_are_valid_pngs_of_expected_size(trained: Path, picture: str, size: tuple[int, int]) -> None:
    with Image.open(trained / "vae" / picture) as im:
        im.verify()
    with Image.open(trained / "vae" / picture) as im:
        assert im.format == "PNG" and im.size == size


def test_no_manifold_for_larger_latents(trained: Path) -> None:
    assert (trained / "deep-tiny" / "latent.png").is_file()
    assert not (trained / "deep-tiny" / "manifold.png").exists()


def test_resume_continues_from_checkpoint(trained: Path, tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, a run is the run that never stopped: same batches, same noise
    (the CPU generator's state, and on a GPU the CUDA one's, travel in the checkpoint)."""
    base = ["--score-base", str(trained / "score-base.pth")]
    args = [*tiny_args(tmp_path / "stopped", "vae"), *base]
    assert train.main(args) == 0
    assert train.main([*args, "--epochs", "2", "--resume"]) == 0
    assert train.main([*tiny_args(tmp_path / "straight", "vae"), *base, "--epochs", "2"]) == 0
    stopped, straight = (json.loads((tmp_path / run / "vae.metrics.json").read_text())["epochs"]
                         for run in ("stopped", "straight"))
    assert [e["epoch"] for e in stopped] == [1, 2]
    assert [(e["train_loss"], e["test_loss"]) for e in stopped] == [(e["train_loss"], e["test_loss"]) for e in straight]
