"""How close the service's image pipeline brings a scanned digit back to MNIST's own 28x28.

The held-out MNIST test digits (the half no score was calibrated on) are drawn the way people
send them: `--scale` times as large, dark ink on white paper, placed off-centre on a larger page,
saved as PNG. Each goes through the service's preprocessing (`app.imaging.file_to_gray28`,
defaults) and is compared with the original: how far its centre of mass lands from MNIST's, the
pixel error, whether the artifact's digit head still names the right digit, and the share each
score flags at the artifact's p99 threshold (the originals' share is the floor: about 1%).

With `--ood`, the pen-stroke sets of the anomaly suite (training/ood_sets.py) are scanned and
prepared the same way and scored against the scanned digits: detection end to end, through the
same preprocessing for both.

    python bench/scan_fidelity.py models/vae.pt --data-dir ../shared/data/mnist --ood
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.contract import DEFAULT_ANOMALY_K
from app.imaging import Preprocess, file_to_gray28
from training import export
from training.anomaly import calibration_split, with_shared_noise
from training.data import load_mnist, to_float
from training.ood import FASHION_DIR, detection_metrics, suite

ROOT = Path(__file__).resolve().parent.parent
PEN_STROKES = ["letters-upper", "letters-lower", "greek-cyrillic", "symbols", "other-scripts", "scribbles", "doodles"]


def scanned(image: np.ndarray, rng: np.random.Generator, scale: int) -> bytes:
    """A 28x28 white-on-black image as a page scan: `scale` times larger, dark on white, somewhere on the page."""
    big = np.asarray(Image.fromarray(image, "L").resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    page = np.zeros((40 * scale, 40 * scale), np.uint8)
    y0, x0 = (int(v) for v in rng.integers(0, 12 * scale + 1, 2))
    page[y0 : y0 + 28 * scale, x0 : x0 + 28 * scale] = big
    buf = io.BytesIO()
    Image.fromarray(255 - page, "L").save(buf, "PNG")
    return buf.getvalue()


def as_served(images: np.ndarray, scale: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([file_to_gray28(scanned(x, rng, scale), 10**9, Preprocess()) for x in images])


def centre_of_mass(x: np.ndarray) -> np.ndarray:
    """[N, 28, 28] -> [N, 2] (row, column) in pixel indices; MNIST's digits sit at (14.0, 14.0)."""
    total = x.sum((1, 2))
    return np.stack([(x.sum(2) * np.arange(28)).sum(1) / total, (x.sum(1) * np.arange(28)).sum(1) / total], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--n", type=int, default=2000, help="held-out test digits to scan")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--ood", action="store_true", help="also scan the suite's pen-stroke sets and score them")
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "ood-sets.npz", help="the OOD suite's cache")
    args = p.parse_args(argv)

    model, meta = export.load(args.artifact)
    mnist = load_mnist(args.data_dir, allow_download=False)
    _, held = calibration_split(mnist.test_images.shape[0], 0)
    idx = held[: args.n]
    originals = mnist.test_images[idx].numpy()
    served = as_served(originals, args.scale)

    offset = np.hypot(*(centre_of_mass(served.astype(np.float64)) - 14.0).T)
    error = np.abs(served.astype(np.float64) - originals).mean((1, 2)) / 255
    print(f"{len(idx)} held-out test digits, scanned x{args.scale} onto a {40 * args.scale}px page")
    print(f"centre of mass from (14, 14), px: median {np.median(offset):.2f}, p90 {np.percentile(offset, 90):.2f}, "
          f"max {offset.max():.2f}")
    print(f"mean absolute pixel error against the original: {error.mean():.4f}")

    methods = meta.get("anomaly_scores", {}).get("methods", {})
    noise = torch.randn(DEFAULT_ANOMALY_K, 1, model.latent_dim, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def scores(x: np.ndarray) -> torch.Tensor:
        return with_shared_noise(model.anomaly_scores_with_noise, to_float(torch.from_numpy(x)), noise)

    digit_scores = {}
    for name, x in [("originals", originals), ("scans", served)]:
        line = f"{name}:"
        if hasattr(model, "head"):
            with torch.no_grad():
                named = model.head(to_float(torch.from_numpy(x)))[:, :10].argmax(1) == mnist.test_labels[idx]
            line += f" the digit head names the digit {float(named.double().mean()):.2%};"
        digit_scores[name] = values = scores(x)
        for method, m in methods.items():
            flagged = float((values[:, m["column"]] > m["calibration"]["quantiles"]["p99"]).double().mean())
            line += f" `{method}` flags {flagged:.2%} (mean {float(values[:, m['column']].mean()):.2f});"
        print(line.rstrip(";"))

    if args.ood and methods:
        sets = suite(mnist.test_images.numpy(), FASHION_DIR, args.cache)
        print("\nscanned pen-stroke sets against the scanned digits: AUROC / FPR at 95% TPR")
        print("| method | " + " | ".join(PEN_STROKES) + " | mean FPR |")
        print("| --- " * (len(PEN_STROKES) + 2) + "|")
        ood = {s: scores(as_served(sets[s].images, args.scale, seed=1)) for s in PEN_STROKES}
        for method, m in methods.items():
            col = m["column"]
            res = [detection_metrics(digit_scores["scans"][:, col], ood[s][:, col]) for s in PEN_STROKES]
            print(f"| {method} | " + " | ".join(f"{r['auroc']:.3f} / {r['fpr_at_95_tpr']:.3f}" for r in res)
                  + f" | {np.mean([r['fpr_at_95_tpr'] for r in res]):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
