"""The fifth round of docs/benchmarks.md#anomaly-detection, to rerun: an artifact's `fisher` score
against the same score with its digit head's three statistics averaged over 17 views of each
image (the image and 16 fixed turns, zooms and shifts), and against heads trained with the
17-view average as a teacher, which cost one pass again.

    python -m research.ood_views models/vae.pt --data-dir ../shared/data/mnist
    python -m research.ood_views models/vae.pt --data-dir ../shared/data/mnist --distil-seeds 0 1 2 --device cuda

`--plain-seeds` trains heads the artifact's way with other seeds, for the spread. Prints, per
score, the AUROC range and the FPR at 95% TPR on the pen-stroke sets, and the share of printed
digits flagged at the p99 of the calibration half. Everything the artifact's own score
uses is kept: the reference images for the tails, the calibration split, the noise (seed 0).
Views are scored in one pass of 17 images per image, so about 17 times the head's cost; a
distilled head takes 4 epochs with 17 teacher passes per training image (16 s on an H100,
about an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomaly.evaluate import FASHION_DIR, detection_metrics, suite
from anomaly.score import (
    METHOD,
    STATISTICS,
    DigitHead,
    Tails,
    calibration_split,
    reference_split,
    train_head,
    view_average,
    views,
    with_shared_noise,
)
from anomaly.suite import PEN_STROKES
from app.contract import DEFAULT_ANOMALY_K
from training import export
from training.data import MNIST, load_mnist, to_float

ROOT = Path(__file__).resolve().parent.parent

HEAD_COLUMNS = slice(STATISTICS.index("broken"), STATISTICS.index("mahalanobis") + 1)  # the head's three


@torch.no_grad()
def head_statistics(head: torch.nn.Module, x: Tensor, maps: Tensor | None, device: torch.device) -> Tensor:
    """(broken, energy, mahalanobis) per image, averaged over the views when `maps` is given."""
    def stats(v: Tensor) -> Tensor:
        return torch.stack(head.statistics(v), 1)

    f = stats if maps is None else view_average(stats, maps)
    # 17 views of 100 images: ~100 MB of activations
    return torch.cat([f(xb.to(device)).cpu() for xb in x.split(1000 if maps is None else 100)])


def report(name: str, stats: dict[str, Tensor]) -> None:
    """Fisher's method over tails fitted on the reference images, as the artifact combines them."""
    tails = Tails(stats["reference"].double())
    score = {g: -tails(s.float()).sum(1).double() for g, s in stats.items()}
    threshold = torch.quantile(score["calibration"], 0.99)
    res = {s: detection_metrics(score["held-out"], score[s]) for s in PEN_STROKES}
    fpr = [res[s]["fpr_at_95_tpr"] for s in PEN_STROKES]
    auroc = [res[s]["auroc"] for s in PEN_STROKES]
    font = float((score["font-digits"] > threshold).double().mean()) if "font-digits" in score else float("nan")
    print(f"| {name} | {min(auroc):.3f}-{max(auroc):.3f} | " + " | ".join(f"{v:.3f}" for v in fpr)
          + f" | {np.mean(fpr):.3f} | {100 * font:.2f}% |", flush=True)


@dataclass
class Bench:
    """An artifact, the MNIST splits its score was fitted with, and its five statistics on every group a
    report needs (reference, calibration, held-out, the pen-stroke sets, printed digits): what a bench
    that swaps in other heads starts from."""

    model: torch.jit.ScriptModule
    meta: dict[str, Any]
    mnist: MNIST
    seed: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    ref_idx: Tensor
    head_idx: Tensor
    calib: Tensor
    groups: dict[str, Tensor]
    served: dict[str, Tensor]
    device: torch.device

    def swapped(self, head: torch.nn.Module, maps: Tensor | None = None) -> dict[str, Tensor]:
        """The served statistics with the head's three replaced by `head`'s (over the views, with `maps`)."""
        out = {}
        for g, x in self.groups.items():
            s = self.served[g].clone()
            s[:, HEAD_COLUMNS] = head_statistics(head.to(self.device), x, maps, self.device)
            out[g] = s
        return out


def start(p: argparse.ArgumentParser, args: argparse.Namespace, train_limit: int | None = None) -> Bench:
    """Load `args.artifact` and score every group with it, then print the table's head and the artifact's
    own row. Refuses (p.error) an artifact without a fitted score."""
    model, meta = export.load(args.artifact)
    fitted = meta.get("anomaly_scores", {}).get("methods", {}).get(METHOD, {}).get("fitted_on")
    if fitted is None:
        p.error(f"{args.artifact} has no fitted `{METHOD}` score")
    seed = int(fitted["seed"])
    mnist = load_mnist(args.data_dir, allow_download=False)
    n = train_limit
    train_x, train_y, test_x = to_float(mnist.train_images[:n]), mnist.train_labels[:n], to_float(mnist.test_images)
    ref_idx, head_idx = reference_split(train_x.shape[0], seed)
    calib, held = calibration_split(test_x.shape[0], seed)
    groups = {"reference": train_x[ref_idx], "calibration": test_x[calib], "held-out": test_x[held]}
    groups |= {k: to_float(torch.from_numpy(s.images)) for k, s in
               suite(mnist.test_images.numpy(), FASHION_DIR, args.cache).items() if k in [*PEN_STROKES, "font-digits"]}
    noise = torch.randn(DEFAULT_ANOMALY_K, 1, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        served = {g: with_shared_noise(model.anomaly_statistics, x, noise).cpu() for g, x in groups.items()}
    print("| score | AUROC | " + " | ".join(PEN_STROKES) + " | mean FPR | font |")
    print("| --- " * (len(PEN_STROKES) + 4) + "|")
    report(f"the artifact's `{METHOD}`", served)
    return Bench(model, meta, mnist, seed, train_x, train_y, test_x, ref_idx, head_idx, calib, groups, served,
                 torch.device(args.device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "ood-sets.npz", help="the OOD suite's cache")
    p.add_argument("--plain-seeds", type=int, nargs="*", default=[], help="train the artifact's head again per seed")
    p.add_argument("--distil-seeds", type=int, nargs="*", default=[], help="train a distilled head per seed")
    p.add_argument("--epochs", type=int, default=4, help="the trained heads' epochs")
    p.add_argument("--device", default="cpu", help="where the heads run and train (cpu, cuda)")
    args = p.parse_args(argv)
    b = start(p, args)
    teacher_head = b.model.head.to(b.device)
    maps = views(16)
    report("its head averaged over 17 views", b.swapped(teacher_head, maps))

    teacher = view_average(teacher_head, maps)
    for s, distil in [(s, False) for s in args.plain_seeds] + [(s, True) for s in args.distil_seeds]:
        head: DigitHead = train_head(b.train_x[b.head_idx], b.train_y[b.head_idx], args.epochs, s, progress=False,
                                     teacher=teacher if distil else None, device=b.device)
        name = "a head distilled from that average" if distil else "the artifact's recipe"
        report(f"{name}, seed {s}", b.swapped(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
