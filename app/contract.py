"""The artifact contract: what a `.pt` file must hold for the service to serve it.

Written down in docs/artifact.md; this module is its executable half, and the only copy:
the training program writes artifacts with these names and formats (it imports this
module), the service reads them with it, and the service never imports the training code.
"""

from __future__ import annotations

import io
import itertools
import math
import zipfile
from typing import Any

import numpy as np

META_FILE = "meta.json"  # TorchScript extra file holding the self-description
# Optional extra file of 2-D models: the test set's posterior means, for the page's latent map (latent_map()).
LATENT_MAP_FILE = "latent_map.json"
INPUT_SHAPE = [1, 28, 28]  # one image, without the batch dimension
# Methods the service calls, with the shapes it calls them with (B images, D = latent_dim, k samples).
METHODS: dict[str, str] = {
    "encode": "(x: [B,1,28,28] float32 in [0,1]) -> (mu: [B,D], logvar: [B,D])",
    "decode": "(z: [B,D]) -> [B,1,28,28] Bernoulli means in [0,1]",
    "forward": "(x: [B,1,28,28]) -> (reconstruction: [B,1,28,28], mu: [B,D], logvar: [B,D]); z = mu in eval mode",
    "log_likelihood": "(x: [B,1,28,28], k: int) -> [B] IWAE lower bound on log p(x), nats",
    "log_likelihood_with_noise": "(x: [B,1,28,28], eps: [k,B,D] standard normal) -> [B], as log_likelihood",
}
# Optional: an artifact that has it serves the anomaly scores meta.json's `anomaly_scores` names.
SCORES_METHOD = "anomaly_scores_with_noise"
# Optional: an artifact that has it serves GET /sample?digit=D.
DIGITS_METHOD = "digit_gaussians"
OPTIONAL_METHODS: dict[str, str] = {
    SCORES_METHOD: "(x: [B,1,28,28], eps: [k,B,D]) -> [B, M] anomaly scores, one column per method in "
                   "meta.json's anomaly_scores; column 0 is the bound, -log_likelihood_with_noise",
    DIGITS_METHOD: "() -> (means: [10,D], scale_tril: [10,D,D]): each digit's Gaussian over the posterior "
                   "mean (lower-triangular Cholesky factors of the covariances), for GET /sample?digit=",
}
# Optional extra file: the MNIST training set's posterior means, labels and images, for POST /similar.
NEIGHBOURS_FILE = "neighbours.npz"
BOUND = "bound"  # the score every artifact has: -log p(x), IWAE bound
# meta.json keys: the service refuses an artifact without the required ones; the rest are shown by GET /models.
REQUIRED_META: dict[str, type] = {"name": str, "latent_dim": int}
META_KEYS = ("name", "arch", "latent_dim", "hidden", "input_shape", "likelihood", "pixels", "config", "dataset",
             "metrics", "anomaly_calibration", "anomaly_scores", "torch_version", "created")

# The anomaly score's calibration: quantiles of -log p(x) (IWAE, k samples) over in-distribution images.
DEFAULT_ANOMALY_K = 64  # k used for calibration, and so the service's default k for a model that names none
CALIBRATION_PERCENTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9)


def quantile_key(percentile: float) -> str:
    """`p99`, `p99.5`: how a percentile is named in meta.json's calibration quantiles."""
    return f"p{percentile:g}"


def calibration_block(k: int, data: str, quantiles: dict[float, float], mean: float, std: float,
                      n: int) -> dict[str, Any]:
    """meta.json's `anomaly_calibration`, written by the training program."""
    return {"k": k, "n": n, "data": data,
            "quantiles": {quantile_key(p): round_up(float(v)) for p, v in sorted(quantiles.items())},
            "mean": round(mean, 4), "std": round(std, 4)}


def round_up(value: float, decimals: int = 4) -> float:
    """`value` to `decimals` places, never below it: a threshold stored a hair under a quantile would flag
    the images scoring exactly there, and a score can have many (the fitted score's pose search clamps
    the images it rescues at its gate, which can be the 99th percentile itself)."""
    scale = 10**decimals
    return math.ceil(value * scale) / scale if math.isfinite(value) else value


def calibration_points(meta: dict[str, Any]) -> tuple[list[tuple[float, float]], int | None]:
    """meta.json's `anomaly_calibration` read back: (percentile, score) points sorted by percentile, and k.

    An artifact without one is still served; its scores then come without percentiles.
    """
    cal = meta.get("anomaly_calibration") or {}
    points = []
    for key, value in (cal.get("quantiles") or {}).items():
        if not (isinstance(key, str) and key.startswith("p")):
            raise ValueError(f"calibration quantile {key!r} is not named like 'p99'")
        p, score = float(key[1:]), float(value)
        if not (0 < p < 100 and math.isfinite(score)):
            raise ValueError(f"calibration quantile {key}={value} is out of range")
        points.append((p, score))
    points.sort()
    if any(b[1] < a[1] for a, b in itertools.pairwise(points)):
        raise ValueError("calibration scores must not decrease with the percentile")
    k = cal.get("k")
    return points, int(k) if k is not None else None


def score_methods(meta: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """meta.json's anomaly scores read back: {name: {column, points, k, about}} and the default name.

    `bound` is always there (column None: computed by log_likelihood_with_noise, calibrated by
    `anomaly_calibration`); `anomaly_scores.methods` adds the others, each with its column of
    anomaly_scores_with_noise and its own calibration.
    """
    points, k = calibration_points(meta)
    methods: dict[str, dict[str, Any]] = {BOUND: {"column": None, "points": points, "k": k,
                                                  "about": "-log p(x), IWAE bound, nats"}}
    block = meta.get("anomaly_scores")
    if block is None:
        return methods, BOUND
    if not isinstance(block, dict) or not isinstance(block.get("methods"), dict):
        raise ValueError("anomaly_scores must be {'default': NAME, 'methods': {NAME: {...}}}")
    for name, m in block["methods"].items():
        if name == BOUND:
            continue
        if not isinstance(m, dict) or not isinstance(m.get("column"), int) or m["column"] < 1:
            raise ValueError(f"anomaly_scores.methods.{name} needs an integer column >= 1")
        pts, mk = calibration_points({"anomaly_calibration": m.get("calibration")})
        methods[name] = {"column": m["column"], "points": pts, "k": mk, "about": str(m.get("about", ""))}
    default = block.get("default", BOUND)
    if default not in methods:
        raise ValueError(f"anomaly_scores.default {default!r} is not among {sorted(methods)}")
    return methods, default


def latent_map_block(mu: list[list[float]], labels: list[int], data: str) -> dict[str, Any]:
    """`latent_map.json`, written by the training program: each test image's posterior mean and digit.

    The extent is where the page draws and decodes: the middle 99.8% of the means, padded by a
    tenth, so that a few stray means do not shrink the map; coordinates keep 3 decimals (a
    thousandth of a unit is far below a pixel of any map).
    """
    xs, ys = sorted(m[0] for m in mu), sorted(m[1] for m in mu)

    def span(v: list[float]) -> list[float]:
        lo, hi = v[int(0.001 * (len(v) - 1))], v[int(0.999 * (len(v) - 1))]
        pad = 0.1 * (hi - lo) or 1.0
        return [round(lo - pad, 3), round(hi + pad, 3)]

    return {"data": data, "n": len(mu), "extent": span(xs) + span(ys),
            "x": [round(m[0], 3) for m in mu], "y": [round(m[1], 3) for m in mu], "label": [int(y) for y in labels]}


def latent_map(block: Any, latent_dim: int) -> dict[str, Any]:
    """`latent_map.json` read back and checked; ValueError says what is wrong with it."""
    if latent_dim != 2:
        raise ValueError(f"a latent map is for 2-D latents, and this model's latent_dim is {latent_dim}")
    if not isinstance(block, dict):
        raise ValueError("must be a JSON object")
    extent = block.get("extent")
    if (not isinstance(extent, list) or len(extent) != 4 or not all(_finite(v) for v in extent)
            or not (extent[0] < extent[1] and extent[2] < extent[3])):
        raise ValueError("extent must be [x_min, x_max, y_min, y_max], finite, min < max")
    x, y, label = block.get("x"), block.get("y"), block.get("label")
    if not (isinstance(x, list) and isinstance(y, list) and isinstance(label, list)) or not len(x) == len(y) == len(
            label):
        raise ValueError("x, y and label must be lists of one length")
    if not all(_finite(v) for v in itertools.chain(x, y)):
        raise ValueError("x and y must be finite numbers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9 for v in label):
        raise ValueError("labels must be digits 0-9")
    return {"data": str(block.get("data", "")), "n": len(x), "extent": extent, "x": x, "y": y, "label": label}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def neighbours_file(mu: np.ndarray, labels: np.ndarray, images: np.ndarray, data: str) -> bytes:
    """`neighbours.npz`, written by the training program: `mu` float32 [N, D] posterior means, `labels` uint8
    [N] digits, `images` uint8 [N, 28, 28] (white on black), `data` what they are. Compressed: the images
    shrink 6x, the means hardly at all."""
    buf = io.BytesIO()
    np.savez_compressed(buf, mu=mu.astype(np.float32), labels=labels.astype(np.uint8),
                        images=images.astype(np.uint8), data=np.array(data))
    return buf.getvalue()


def neighbours(data: bytes, latent_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`neighbours.npz` read back and checked: (mu, labels, images); ValueError says what is wrong."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            mu, labels, images = f["mu"], f["labels"], f["images"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"not an .npz with mu, labels and images ({e})") from e
    n = len(mu)
    if mu.dtype != np.float32 or mu.shape != (n, latent_dim) or n == 0:
        raise ValueError(f"mu must be float32 [N, {latent_dim}], N >= 1; got {mu.dtype} {list(mu.shape)}")
    if not np.isfinite(mu).all():
        raise ValueError("mu must be finite")
    if labels.dtype != np.uint8 or labels.shape != (n,) or labels.max() > 9:
        raise ValueError(f"labels must be uint8 [{n}] digits 0-9")
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
        raise ValueError(f"images must be uint8 [{n}, 28, 28]")
    return mu, labels, images
