"""What an artifact's default score lets through of a set at the operating point of the issue's target:
the whole 5% of each set that scores lowest, i.e. the images that decide its FPR at 95% TPR.

    python -m research.ood_tail models/vae.pt --sets other-scripts doodles --out docs/ood

`vae-eval --ood --pictures` shows the 8 most normal images of each set; when a set misses the target,
the question is whether those 8 are a sample of many kinds or the whole tail is one kind. Writes
`<model>-<set>-tail.png` (the tail, lowest score first) and prints, per set, the FPR at 95% TPR on
the held-out MNIST digits (as `vae-eval --ood` computes it), the share of the set that scores
below the 95th percentile of those digits, and what the tail is made of: how many of each character
or shape, against how many of it the set has.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from anomaly.evaluate import FASHION_DIR, all_scores, detection_metrics, suite
from anomaly.score import calibration_split
from anomaly.suite import PEN_STROKES, sheet
from app.contract import DEFAULT_ANOMALY_K
from training import export
from training.data import load_mnist, to_float

ROOT = Path(__file__).resolve().parent.parent


def lowest(scores: torch.Tensor, share: float = 0.05) -> np.ndarray:
    """Indices of the `share` of a set that scores lowest, lowest first: at 95% TPR, what a score lets through."""
    return scores.argsort()[: round(share * len(scores))].numpy()


def tail_counts(labels: np.ndarray, scores: torch.Tensor) -> str:
    """What the 5% of a set that scores lowest is made of: 'house 54 (154), ...', each with how many of it
    the set has."""
    tail = lowest(scores)
    drawn = Counter(labels.tolist())
    return ", ".join(f"{what} {k} ({drawn[what]})" for what, k in Counter(labels[tail].tolist()).most_common())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "ood-sets.npz", help="the OOD suite's cache")
    p.add_argument("--sets", nargs="+", default=list(PEN_STROKES), choices=PEN_STROKES)
    p.add_argument("--out", type=Path, default=Path("docs/ood"))
    args = p.parse_args(argv)

    model, meta = export.load(args.artifact)
    block = meta.get("anomaly_scores")
    if block is None:
        p.error(f"{args.artifact} has no fitted score")
    method = block["default"]
    mnist = load_mnist(args.data_dir, allow_download=False)
    sets = suite(mnist.test_images.numpy(), FASHION_DIR, args.cache)
    _, held = calibration_split(mnist.test_images.shape[0], 0)
    digits = all_scores(model, meta, to_float(mnist.test_images)[held], DEFAULT_ANOMALY_K)[method]
    p95 = torch.quantile(digits.double(), 0.95)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        images = sets[name].images
        s = all_scores(model, meta, to_float(torch.tensor(images)), DEFAULT_ANOMALY_K)[method]
        tail = lowest(s)
        fpr = detection_metrics(digits, s)["fpr_at_95_tpr"]
        path = args.out / f"{meta['name']}-{name}-tail.png"
        sheet(images[tail], cols=20).save(path)
        print(f"{name}: the {len(tail)} of {len(s)} images that score lowest -> {path}; FPR at 95% TPR {fpr:.3f}; "
              f"share of the set below the held-out digits' 95th percentile: {float((s < p95).double().mean()):.3f}")
        if sets[name].labels is not None:
            print("  in the tail (of all drawn): " + tail_counts(sets[name].labels, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
