"""How close the service's image pipeline brings a digit sent as a scan or a photo back to MNIST's own 28x28.

The held-out MNIST test digits (the half no score was calibrated on) are drawn the way people
send them (`--pages`, see `page`): `--scale` times as large, dark ink on a page, scanned or
photographed. Each goes through the service's preprocessing (`app.imaging.file_to_gray28`,
defaults) and is compared with the original: how far its centre of mass lands from MNIST's, the
pixel error, whether the artifact's digit head still names the right digit, and the share each
score flags at the artifact's p99 threshold (the originals' share is the floor: about 1%).

With `--ood`, the pen-stroke sets of the anomaly suite (anomaly/suite.py) are sent the same
way and scored against the digits sent so: detection end to end, through the same preprocessing
for both.

    python -m research.scan_fidelity models/vae.pt --data-dir ../shared/data/mnist --ood
    python -m research.scan_fidelity models/vae.pt --scale 8 --n 1000 --pages photo gradient vignette specks marker
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from anomaly.evaluate import FASHION_DIR, detection_metrics, suite, thresholds
from anomaly.score import calibration_split, with_shared_noise
from anomaly.suite import PEN_STROKES
from app.contract import DEFAULT_ANOMALY_K
from app.imaging import Preprocess, file_to_gray28
from research.ood_tail import tail_counts
from training import export
from training.data import load_mnist, to_float

ROOT = Path(__file__).resolve().parent.parent


PAGES = ("scan", "photo", "gradient", "vignette", "specks", "marker")


def page(image: np.ndarray, rng: np.random.Generator, scale: int, kind: str = "scan") -> bytes:
    """A 28x28 white-on-black image as a user sends it, `scale` times larger, dark ink somewhere on a page:

    scan: white paper, PNG. photo: grey paper, blurred, sensor noise, JPEG. gradient: the same with the
    light falling off across the page (by 20-40%); vignette: into the corners (to 40%); specks: three dark
    4x4-px-at-x8 specks of dust somewhere on the page; marker: the strokes widened by a marker, the digit
    filling the photo, light falling off by 17% across it."""
    ink = np.asarray(Image.fromarray(image, "L").resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR),
                     np.float64) / 255
    if kind == "scan":
        sheet = np.zeros((40 * scale, 40 * scale))
        y0, x0 = (int(v) for v in rng.integers(0, 12 * scale + 1, 2))
        sheet[y0 : y0 + 28 * scale, x0 : x0 + 28 * scale] = ink
        buf = io.BytesIO()
        Image.fromarray((255 - np.rint(255 * sheet)).astype(np.uint8), "L").save(buf, "PNG")
        return buf.getvalue()
    h, w = (30 * scale, 30 * scale) if kind == "marker" else (48 * scale, 40 * scale)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    paper = np.full((h, w), 235.0)
    if kind == "gradient":
        low, angle = rng.uniform(0.6, 0.8), rng.uniform(0, 2 * np.pi)
        paper *= low + (1 - low) * (0.5 + np.cos(angle) * (yy - 0.5) + np.sin(angle) * (xx - 0.5))
    elif kind == "vignette":
        paper *= 1 - 1.2 * ((yy - h / max(h, w) / 2) ** 2 + (xx - w / max(h, w) / 2) ** 2)
    elif kind == "specks":
        for _ in range(3):
            y, x = (int(rng.integers(0, n - scale // 2)) for n in (h, w))
            paper[y : y + scale // 2, x : x + scale // 2] = 60
    elif kind == "marker":
        ink = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(scale + 1)),
                         np.float64) / 255
        paper *= 0.83 + 0.17 * xx
    y0, x0 = (scale, scale) if kind == "marker" else (int(rng.integers(0, h - 28 * scale)),
                                                      int(rng.integers(0, w - 28 * scale)))
    paper[y0 : y0 + 28 * scale, x0 : x0 + 28 * scale] *= 1 - 0.85 * ink
    blurred = np.asarray(Image.fromarray(paper.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)),
                         np.float64)
    noisy = (blurred + rng.normal(0, 5, blurred.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "L").convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def as_served(images: np.ndarray, scale: int, kind: str = "scan", seed: int = 0) -> tuple[np.ndarray, float]:
    """The images as the service prepares them, and the seconds that took per image (decoding included)."""
    rng = np.random.default_rng(seed)
    pages = [page(x, rng, scale, kind) for x in images]
    t0 = time.perf_counter()
    served = np.stack([file_to_gray28(p, 10**9, Preprocess()) for p in pages])
    return served, (time.perf_counter() - t0) / len(pages)


def centre_of_mass(x: np.ndarray) -> np.ndarray:
    """[N, 28, 28] -> [N, 2] (row, column) in pixel indices; MNIST's digits sit at (14.0, 14.0)."""
    total = x.sum((1, 2))
    return np.stack([(x.sum(2) * np.arange(28)).sum(1) / total, (x.sum(1) * np.arange(28)).sum(1) / total], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--n", type=int, default=2000, help="held-out test digits to send")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--pages", nargs="+", choices=PAGES, default=["scan"], help="how the digits are sent")
    p.add_argument("--ood", action="store_true", help="also send the suite's pen-stroke sets so, and score them")
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "ood-sets.npz", help="the OOD suite's cache")
    args = p.parse_args(argv)

    model, meta = export.load(args.artifact)
    mnist = load_mnist(args.data_dir, allow_download=False)
    _, held = calibration_split(mnist.test_images.shape[0], 0)
    idx = held[: args.n]
    originals = mnist.test_images[idx].numpy()
    methods = meta.get("anomaly_scores", {}).get("methods", {})
    p99 = thresholds(meta)
    noise = torch.randn(DEFAULT_ANOMALY_K, 1, model.latent_dim, generator=torch.Generator().manual_seed(0))
    sets = suite(mnist.test_images.numpy(), FASHION_DIR, args.cache) if args.ood and methods else {}

    @torch.no_grad()
    def scores(x: np.ndarray) -> torch.Tensor:
        return with_shared_noise(model.anomaly_scores_with_noise, to_float(torch.from_numpy(x)), noise)

    def report(name: str, x: np.ndarray) -> torch.Tensor:
        line = f"{name}:"
        if hasattr(model, "head"):
            with torch.no_grad():
                named = model.head(to_float(torch.from_numpy(x)))[:, :10].argmax(1) == mnist.test_labels[idx]
            line += f" the digit head names the digit {float(named.double().mean()):.2%};"
        values = scores(x)
        for method, m in methods.items():
            flagged = float((values[:, m["column"]] > p99[method]).double().mean())
            line += f" `{method}` flags {flagged:.2%} (mean {float(values[:, m['column']].mean()):.2f});"
        print(line.rstrip(";"), flush=True)
        return values

    print(f"{len(idx)} held-out test digits; sent x{args.scale}")
    report("originals", originals)
    for kind in args.pages:
        served, seconds = as_served(originals, args.scale, kind)
        offset = np.hypot(*(centre_of_mass(served.astype(np.float64)) - 14.0).T)
        error = np.abs(served.astype(np.float64) - originals).mean((1, 2)) / 255
        print(f"\n{kind}: centre of mass from (14, 14), px: median {np.median(offset):.2f}, "
              f"p90 {np.percentile(offset, 90):.2f}, max {offset.max():.2f}; "
              f"mean absolute pixel error against the original: {error.mean():.4f}; "
              f"prepared in {1000 * seconds:.2f} ms per image")
        digits = report(kind, served)
        if not sets:
            continue
        print(f"pen-stroke sets sent as {kind} against the digits sent so: AUROC / FPR at 95% TPR")
        print("| method | " + " | ".join(PEN_STROKES) + " | mean FPR |")
        print("| --- " * (len(PEN_STROKES) + 2) + "|")
        ood = {s: scores(as_served(sets[s].images, args.scale, kind, seed=1)[0]) for s in PEN_STROKES}
        for method, m in methods.items():
            col = m["column"]
            res = [detection_metrics(digits[:, col], ood[s][:, col]) for s in PEN_STROKES]
            print(f"| {method} | " + " | ".join(f"{r['auroc']:.3f} / {r['fpr_at_95_tpr']:.3f}" for r in res)
                  + f" | {np.mean([r['fpr_at_95_tpr'] for r in res]):.3f} |", flush=True)
        col = methods[meta["anomaly_scores"]["default"]]["column"]
        for s in PEN_STROKES:
            if sets[s].labels is not None:
                print(f"{s}, the 5% the default score finds most normal: {tail_counts(sets[s].labels, ood[s][:, col])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
