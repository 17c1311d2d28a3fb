"""How well the served anomaly score separates MNIST from what is not MNIST.

The score is exactly the service's: -log p(x) by the IWAE bound with k samples and
one shared draw of noise per seed (app/inference.py), on continuous pixels. In-
distribution: the MNIST test set. Out: Fashion-MNIST test, uniform noise, and the
MNIST test digits flipped upside down. Reported: AUROC, the false-positive rate at
95% true-positive rate (anomalies are the positives), and how many MNIST test
images the default threshold flags.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor

from app.contract import quantile_key
from training.data import DataError, batches, parse_idx, read_bytes, to_float

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_fashion_test(folder: Path = FASHION_DIR) -> Tensor:
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        raise DataError(f"Fashion-MNIST not found at {path} (Debian: apt-get install dataset-fashion-mnist)")
    return to_float(torch.from_numpy(parse_idx(read_bytes(path), str(path)).copy()))


@torch.no_grad()
def scores(model: Any, x: Tensor, k: int, seed: int = 0, batch_size: int = 100, progress: bool = True) -> Tensor:
    """The service's anomaly score for each image (same noise for every image, as the service draws it)."""
    d = int(model.encode(x[:1])[0].shape[1])
    noise = torch.randn(k, 1, d, generator=torch.Generator().manual_seed(seed)).to(x.device)
    return torch.cat([-model.log_likelihood_with_noise(xb, noise.expand(k, xb.shape[0], d))
                      for xb in batches(x, batch_size, f"scores k={k}", progress)])


def png_bits(x: Tensor) -> Tensor:
    """Compressed size in bits of each image as an 8-bit PNG: the complexity estimate of Serrà et al. (2020)."""
    sizes = []
    for img in x.mul(255).round().to(torch.uint8)[:, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, "PNG", optimize=True)
        sizes.append(8 * len(buf.getvalue()))
    return torch.tensor(sizes, dtype=torch.float64)


def detection_metrics(inlier: Tensor, outlier: Tensor) -> dict[str, float]:
    y = np.concatenate([np.zeros(len(inlier)), np.ones(len(outlier))])
    s = np.concatenate([inlier.double().numpy(), outlier.double().numpy()])
    s = np.nan_to_num(s, nan=np.inf, posinf=1e30)
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": round(float(roc_auc_score(y, s)), 4),
            "fpr_at_95_tpr": round(float(fpr[np.searchsorted(tpr, 0.95)]), 4)}


def ood_sets(mnist_test: Tensor, fashion_dir: Path, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "Fashion-MNIST test": load_fashion_test(fashion_dir),
        "uniform noise": torch.rand(mnist_test.shape[0], 1, 28, 28, generator=gen),
        "MNIST test flipped upside down": mnist_test.flip(-2),
    }


def evaluate_ood(model: Any, meta: dict[str, Any], mnist_test: Tensor, fashion_dir: Path, ks: list[int],
                 threshold_percentile: float = 99.0, limit: int | None = None) -> list[dict[str, Any]]:
    x_in = mnist_test[:limit] if limit else mnist_test
    sets = {name: (x[:limit] if limit else x) for name, x in ood_sets(mnist_test, fashion_dir).items()}
    bits = {name: png_bits(x) for name, x in [("MNIST", x_in), *sets.items()]}
    quantiles = (meta.get("anomaly_calibration") or {}).get("quantiles", {})
    threshold = quantiles.get(quantile_key(threshold_percentile))
    rows = []
    for k in ks:
        s_in = scores(model, x_in, k)
        flagged = float((s_in > threshold).double().mean()) if threshold is not None else math.nan
        for name, x in sets.items():
            s_out = scores(model, x, k)
            plain = detection_metrics(s_in, s_out)
            corrected = detection_metrics(s_in.double() - bits["MNIST"] * math.log(2),
                                          s_out.double() - bits[name] * math.log(2))
            rows.append({"model": meta.get("name"), "k": k, "ood": name, **plain,
                         "complexity_corrected_auroc": corrected["auroc"],
                         "complexity_corrected_fpr_at_95_tpr": corrected["fpr_at_95_tpr"],
                         "mnist_flagged_at_default_threshold": round(flagged, 4),
                         "threshold_percentile": threshold_percentile, "calibration_k": meta.get(
                             "anomaly_calibration", {}).get("k")})
    return rows
