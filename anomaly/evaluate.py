"""How well each anomaly score separates MNIST digits from what is not one: `vae-eval --ood MODEL.pt ...`.

The scores are exactly the service's: the artifact's own methods with one shared draw of noise
per seed (app/inference.py), on every image as the service preprocesses a 28x28 image file
(`as_served`). In-distribution: the half of the MNIST test set that no score was
fitted or calibrated on (anomaly/score.py `calibration_split`). Out: the suite of
anomaly/suite.py. Reported per model, method and set: AUROC and the false-positive rate at
95% true-positive rate (anomalies are the positives), and the share flagged at the artifact's
own p99 threshold: of the unseen MNIST half (should be ~1%), of each OOD set, and of digits
printed in fonts (not anomalies: should stay low).

Besides the served methods, candidates are measured from the same artifact: each statistic of
the fitted score alone (those meta.json names: `latent`, `broken`, `energy`, `mahalanobis`), and
the bound corrected by input complexity (Serrà et al. 2020, PNG bits).
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor
from tqdm import tqdm

from anomaly.score import as_served, calibration_split
from anomaly.suite import OodSet, build_sets, cached_sets, sheet
from app.contract import BOUND, score_methods
from training.data import DataError, parse_idx, read_bytes, to_float

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SEEN = {"mnist-rot90", "mnist-mirror"}  # broken the way the digit head's negatives are: not unseen
SYMMETRIC = {"mnist-rot90": "none (a 90-degree turn maps no digit onto a digit; a 1 becomes a dash)",
             "mnist-mirror": "0, 1 and 8 (mirror-symmetric: indistinguishable from the originals)"}


def load_fashion_test(folder: Path = FASHION_DIR) -> np.ndarray:
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        raise DataError(f"Fashion-MNIST not found at {path} (Debian: apt-get install dataset-fashion-mnist)")
    return parse_idx(read_bytes(path), str(path))


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


@torch.no_grad()
def all_scores(model: Any, meta: dict[str, Any], x: Tensor, k: int, seed: int = 0,
               batch_size: int = 250) -> dict[str, Tensor]:
    """Every served method's score and every candidate's, per image (noise shared, as the service draws it)."""
    methods, _ = score_methods(meta)
    d = int(meta["latent_dim"])
    noise = torch.randn(k, 1, d, generator=torch.Generator().manual_seed(seed))
    out: dict[str, list[Tensor]] = {}
    one_pass: bool | None = None  # whether the scores can be had from the statistics' pass (first batch says)
    for xb in x.split(batch_size):
        eps = noise.expand(k, xb.shape[0], d)
        if hasattr(model, "anomaly_scores_with_noise") and len(methods) > 1:
            stats = model.anomaly_statistics(xb, eps)
            if one_pass:
                table = fisher_table(model, stats)
            else:
                table = model.anomaly_scores_with_noise(xb, eps)  # column 0 is the bound (the contract)
                one_pass = (one_pass is None and hasattr(model, "tails") and not searches_poses(model)
                            and torch.equal(fisher_table(model, stats), table))
            cols = {BOUND: table[:, 0]}
            cols.update({n: table[:, m["column"]] for n, m in methods.items() if m["column"] is not None})
            cols.update({f"{name} (alone)": stats[:, j] for j, name in enumerate(statistics(meta)) if j > 0})
        else:
            cols = {BOUND: -model.log_likelihood_with_noise(xb, eps)}
        for name, v in cols.items():
            out.setdefault(name, []).append(v.double())
    scores = {n: torch.cat(v) for n, v in out.items()}
    scores["bound - complexity (Serra)"] = scores[BOUND] - png_bits(x) * math.log(2)
    return scores


def searches_poses(model: Any) -> bool:
    """Whether the artifact's score turns the images above its gate (anomaly/score.py's ScoredVAE): its
    scores then cannot be had from one pass of the statistics."""
    return hasattr(model, "poses") and model.poses.shape[0] > 0


def fisher_table(model: Any, stats: Tensor) -> Tensor:
    """What a fitted artifact's `anomaly_scores_with_noise` returns, from its `anomaly_statistics`: the
    bound, and -sum of the statistics' log tail probabilities (anomaly/score.py's ScoredVAE). Both
    methods run the whole model, k decoder passes each, so scoring from one halves the suite's time;
    `all_scores` takes this path only once it gave the artifact's own answer bit for bit."""
    return torch.stack([stats[:, 0], -model.tails(stats).sum(dim=1)], dim=1)


def statistics(meta: dict[str, Any]) -> list[str]:
    """The names of the artifact's `anomaly_statistics` columns (the three of the first fitted artifacts
    when meta.json does not list them)."""
    fitted = meta.get("anomaly_scores", {}).get("methods", {})
    return next((m["statistics"] for m in fitted.values() if "statistics" in m), ["bound", "latent", "head"])


def thresholds(meta: dict[str, Any], percentile: float = 99.0) -> dict[str, float]:
    methods, _ = score_methods(meta)
    out = {}
    for name, m in methods.items():
        points = dict(m["points"])
        if percentile in points:
            out[name] = points[percentile]
    return out


def evaluate_suite(model: Any, meta: dict[str, Any], mnist_test: Tensor, sets: dict[str, OodSet], k: int,
                   seed: int = 0, pictures: Path | None = None) -> list[dict[str, Any]]:
    """One row per (method, set): AUROC, FPR@95%TPR and share flagged at the artifact's p99 threshold."""
    _, held_out = calibration_split(mnist_test.shape[0], seed)
    x_in = as_served(mnist_test[held_out])
    s_in = all_scores(model, meta, x_in, k, seed)
    thr = thresholds(meta)
    rows = []
    # every set as the service scores a 28x28 image file of it (as_served); torch.tensor copies: the cached
    # sets are read-only arrays, which torch.from_numpy warns about
    s_sets = {name: all_scores(model, meta, as_served(to_float(torch.tensor(s.images))), k, seed)
              for name, s in tqdm(sets.items(), desc=f"{meta['name']}: scoring the sets", unit="set", disable=None)}
    for method, inlier in s_in.items():
        t = thr.get(method)
        rows.append({"model": meta["name"], "method": method, "set": "MNIST held-out", "kind": "in",
                     "n": len(inlier), "flagged_at_p99": None if t is None else round(float((inlier > t).double()
                                                                                             .mean()), 4)})
        for name, s in sets.items():
            out = s_sets[name][method]
            row = {"model": meta["name"], "method": method, "set": name, "kind": s.kind, "n": len(out),
                   "seen": name in SEEN, **detection_metrics(inlier, out),
                   "flagged_at_p99": None if t is None else round(float((out > t).double().mean()), 4)}
            rows.append(row)
        if pictures is not None:
            failure_cases(x_in, inlier, sets, {n: v[method] for n, v in s_sets.items()},
                          pictures / f"{meta['name']}-{slug(method)}.png")
    return rows


def slug(method: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in method.split(" (")[0]).strip("-")


def failure_cases(x_in: Tensor, s_in: Tensor, sets: dict[str, OodSet], s_out: dict[str, Tensor], path: Path,
                  n: int = 8) -> None:
    """Top row: the n held-out MNIST digits the score finds most anomalous; then per set, the n images it
    finds most normal: the mistakes at either end, which say most about a score."""
    rows = [(x_in[s_in.argsort(descending=True)[:n], 0].mul(255).round().to(torch.uint8).numpy(), "MNIST")]
    for name, s in sets.items():
        rows.append((s.images[s_out[name].argsort()[:n].numpy()], name))
    tiles = np.concatenate([r for r, _ in rows])
    img = sheet(tiles, cols=n).convert("RGB")
    label = Image.new("RGB", (110, img.height), (255, 255, 255))
    draw = ImageDraw.Draw(label)
    for i, (_, name) in enumerate(rows):
        draw.text((4, i * 30 + 9), name, fill=(0, 0, 0))
    canvas = Image.new("RGB", (label.width + img.width, img.height), (255, 255, 255))
    canvas.paste(label, (0, 0))
    canvas.paste(img, (label.width, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def suite(mnist_test_u8: np.ndarray, fashion_dir: Path, cache: Path, n: int = 2000, seed: int = 0) -> dict[str, OodSet]:
    try:
        fashion = load_fashion_test(fashion_dir)
    except DataError as e:
        print(f"warning: {e}; the fashion set is left out", file=sys.stderr)
        fashion = None
    _, held_out = calibration_split(len(mnist_test_u8), seed)
    return cached_sets(cache, lambda: build_sets(mnist_test_u8, fashion, n, seed, held_out.numpy()))


def markdown(rows: list[dict[str, Any]], field: str) -> str:
    """A table: one line per (model, method), one column per set."""
    sets = list(dict.fromkeys(r["set"] for r in rows if r["set"] != "MNIST held-out"))
    head = "| model | method | " + " | ".join(f"{s}{' (seen)' if s in SEEN else ''}" for s in sets) + " |"
    lines = [head, "|" + " --- |" * (len(sets) + 2)]
    keys = list(dict.fromkeys((r["model"], r["method"]) for r in rows))
    for model, method in keys:
        cells = {r["set"]: r.get(field) for r in rows if (r["model"], r["method"]) == (model, method)}
        lines.append(f"| {model} | {method} | " + " | ".join("-" if cells.get(s) is None else f"{cells[s]:.3f}"
                                                           for s in sets) + " |")
    return "\n".join(lines)


def flagged_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | MNIST held-out flagged at p99 | font digits flagged at p99 |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        if r["set"] == "MNIST held-out" and r["flagged_at_p99"] is not None:
            font = next((x["flagged_at_p99"] for x in rows if (x["model"], x["method"], x["set"]) ==
                         (r["model"], r["method"], "font-digits")), None)
            lines.append(f"| {r['model']} | {r['method']} | {r['flagged_at_p99']:.2%} | "
                         + ("-" if font is None else f"{font:.2%}") + " |")
    return "\n".join(lines)

