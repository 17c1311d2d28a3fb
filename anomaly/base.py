"""The part of the default anomaly score that does not depend on the VAE it scores, built once and shipped.

The score (anomaly/score.py) combines six statistics. Two of its parts are the same whatever VAE
they are attached to: the digit head (a CNN that names the digit, or a broken one) and the
glyphs-to-digits likelihood ratio's two models (anomaly/ratio.py). Both train on MNIST
and on glyphs drawn from Debian's fonts, for about 15 minutes on two cores. So they are trained
once, saved as a versioned file beside the models (`models/score-base-v1.pth`, this repository
ships one) and reused by `vae-train` and `vae-fit-score`, which then fit only what depends on the
VAE: the latent mixture, the tails and the calibration (seconds to a minute). Fonts, and the long
fits, are needed only to build a new base: `vae-build-score-base`.

The base records the seed of the split of MNIST's 60,000 training images its parts trained on:
the tails' reference images are the ones they did not see (`anomaly.reference_split`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomaly.ratio import HIDDEN, LATENT, GlyphRatio
from anomaly.score import (
    METHOD,
    DigitHead,
    ScoredVAE,
    artifact_head,
    assemble,
    calibration_split,
    ensemble,
    recipe,
    reference_split,
    train_head,
    view_average,
    views,
    with_score,
)
from app.devices import NoGpu, resolve_device
from training import export
from training.data import DataError, load_mnist, to_float
from training.model import DeepVAE, VAEBase

FORMAT = "mnist-vae-score-base"
VERSION = 1
DEFAULT_PATH = Path(f"models/score-base-v{VERSION}.pth")
MNIST_TRAIN_IMAGES = 60_000
BUILD = "vae-build-score-base"


class MissingScoreBase(RuntimeError):
    pass


@dataclass
class ScoreBase:
    head: DigitHead
    ratio: GlyphRatio | None  # None: a score without its ratio statistic (built with --ratio-epochs 0)
    seed: int  # of reference_split over MNIST's training images
    fitted_on: dict[str, Any]  # how the head (and under "ratio", the ratio) was trained: meta.json's `fitted_on`

    def reference_indices(self, n: int) -> Tensor:
        """The tails' reference images among the first n MNIST training images: those neither the head nor
        the ratio's digit model trained on (about one in six)."""
        ref, _ = reference_split(MNIST_TRAIN_IMAGES, self.seed)
        return ref[ref < n]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        head_shape = {"features": self.head.classes.in_features, "channels": self.head.features[0].out_channels}
        fitted_on = json.loads(json.dumps(self.fitted_on))  # plain types (torch.__version__ is a str subclass)
        torch.save({"format": FORMAT, "version": VERSION, "seed": self.seed, "fitted_on": fitted_on,
                    "head": self.head.state_dict(), "head_shape": head_shape,
                    "ratio": None if self.ratio is None else self.ratio.state_dict()}, path)

    @classmethod
    def load(cls, path: Path) -> ScoreBase:
        if not path.is_file():
            raise MissingScoreBase(f"no score base at {path}: build one with `{BUILD}` (or take the shipped one's "
                                   f"from a scored artifact: `{BUILD} --from-artifact models/vae.pt`), or pass "
                                   "--no-score to serve the plain bound")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT or saved.get("version") != VERSION:
            raise MissingScoreBase(f"{path} is not a version-{VERSION} score base (format {saved.get('format')!r}, "
                                   f"version {saved.get('version')!r}): rebuild it with `{BUILD}`")
        head = DigitHead(**saved["head_shape"])
        head.load_state_dict(saved["head"])
        ratio = None
        if saved["ratio"] is not None:
            noise = saved["ratio"]["noise"]
            ratio = GlyphRatio(DeepVAE(LATENT, HIDDEN), DeepVAE(LATENT, HIDDEN), k=noise.shape[0])
            ratio.load_state_dict(saved["ratio"])
        for p in [*head.parameters(), *(ratio.parameters() if ratio is not None else [])]:
            p.requires_grad_(False)
        return cls(head.eval(), ratio if ratio is None else ratio.eval(), int(saved["seed"]), saved["fitted_on"])

    def attach(self, vae: VAEBase, meta: dict[str, Any], train_x: Tensor, train_y: Tensor, test_x: Tensor,
               k: int) -> tuple[ScoredVAE, dict[str, Any]]:
        """The VAE with the default score around this base's head and ratio, and its meta.json with
        `anomaly_scores` and the bound's calibration taken from the same held-out half of the test set:
        the latent mixture on the training images, the tails on those of them the base's parts did not
        train on, the calibration on half the test set."""
        calib, _ = calibration_split(test_x.shape[0], self.seed)
        ref_idx = self.reference_indices(train_x.shape[0])
        if ref_idx.numel() < 2:
            raise ValueError(f"only {ref_idx.numel()} of the first {train_x.shape[0]} training images are "
                             "reference images for the tails: train on more")
        model, block = assemble(vae, self.head, train_x.cpu(), train_y.cpu(), ref_idx, test_x.cpu()[calib], k,
                                self.seed, dict(self.fitted_on), self.ratio)
        return model, with_score(meta, block, test_x.shape[0], self.seed)

    @classmethod
    def from_artifact(cls, path: Path) -> ScoreBase:
        """The head and ratio inside an artifact with a fitted score (the shipped `vae`'s: distilled on a GPU)."""
        module, meta = export.load(path)
        fitted = meta.get("anomaly_scores", {}).get("methods", {}).get(METHOD, {}).get("fitted_on")
        if fitted is None:
            raise MissingScoreBase(f"{path} has no fitted `{METHOD}` score to take a base from")
        state = module.state_dict()
        ratio = None
        if any(k.startswith("ratio.digits.") for k in state):
            ratio_state = {k.removeprefix("ratio."): v for k, v in state.items() if k.startswith("ratio.")}
            ratio = GlyphRatio(DeepVAE(LATENT, HIDDEN), DeepVAE(LATENT, HIDDEN), k=ratio_state["noise"].shape[0])
            ratio.load_state_dict(ratio_state)
            ratio.eval()
        fitted_on = {k: v for k, v in fitted.items() if k not in ("reference_images", "seed")}
        return cls(artifact_head(module), ratio, int(fitted["seed"]), fitted_on)


def build(train_x: Tensor, train_y: Tensor, epochs: int, seed: int, ratio_epochs: int, glyphs: int, printed: int,
          distil_views: int = 0, distil_teachers: int = 1, device: str | torch.device = "cpu",
          progress: bool = True) -> ScoreBase:
    """Train the head on the training digits that are not the tails' reference images, and the ratio's two
    models on the same digits plus printed digits and other scripts' letters (the fonts are needed here).

    With `distil_views` (17 measured: the image and 16 fixed turns, zooms and shifts), that head then
    teaches a second one with its logits averaged over those views (`view_average`); the second is
    kept. With `distil_teachers` N, heads of seeds seed+1 ... seed+N-1 are trained too and the teacher
    is the mean of the N view averages (the shipped base: 3). Each training image then costs views x
    teachers teacher passes, so it is meant for a GPU (`device`)."""
    _, head_idx = reference_split(MNIST_TRAIN_IMAGES, seed)
    head_idx = head_idx[head_idx < train_x.shape[0]]
    hx, hy = train_x[head_idx], train_y[head_idx]
    head = train_head(hx, hy, epochs, seed, progress=progress, device=device)
    if distil_views:
        maps = views(distil_views - 1, seed)
        heads = [head] + [train_head(hx, hy, epochs, seed + i, progress=progress, device=device)
                          for i in range(1, distil_teachers)]
        teacher = ensemble([view_average(h.to(device), maps) for h in heads])
        head = train_head(hx, hy, epochs, seed, progress=progress, teacher=teacher, device=device)
    fitted_on = recipe(int(head_idx.numel()), epochs, device, distil_views, distil_teachers)
    ratio, fitted_on["ratio"] = None, None
    if ratio_epochs > 0:
        from anomaly.ratio import fit_ratio  # draws glyphs with fontTools from Debian's fonts

        ratio, fitted_on["ratio"] = fit_ratio(hx, ratio_epochs, glyphs, printed, seed, progress=progress,
                                              device=device)
    return ScoreBase(head, ratio, seed, fitted_on)


def main(argv: list[str] | None = None) -> int:
    from anomaly.glyph_pool import MissingFonts, check_fonts

    p = argparse.ArgumentParser(prog=BUILD, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_PATH)
    p.add_argument("--from-artifact", type=Path, default=None, metavar="MODEL.pt",
                   help="take the head and ratio out of an artifact with a fitted score instead of training them")
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--epochs", type=int, default=4, help="digit-head training epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="the first N training images only (smoke runs)")
    p.add_argument("--distil-views", type=int, default=0, metavar="N",
                   help="train the head twice, the second time taught by the first averaged over N views of each "
                        "image (17 measured: steadier, better on letters; N passes per training image)")
    p.add_argument("--distil-teachers", type=int, default=1, metavar="N",
                   help="with --distil-views: the teacher is N heads (seeds SEED..SEED+N-1), their view averages "
                        "averaged")
    p.add_argument("--ratio-epochs", type=int, default=40,
                   help="epochs of the ratio's two models (anomaly/ratio.py); 0: a base without the ratio")
    p.add_argument("--ratio-glyphs", type=int, default=60_000, help="letters of other scripts its glyph model sees")
    p.add_argument("--ratio-printed", type=int, default=20_000, help="printed digits its digit model sees")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the parts train")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.distil_views < 0:
        p.error("--distil-views must be 0 (off) or more")
    if args.distil_teachers < 1:
        p.error("--distil-teachers must be 1 or more")
    if args.from_artifact is not None:
        try:
            base = ScoreBase.from_artifact(args.from_artifact)
        except MissingScoreBase as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        base.save(args.out)
        print(f"wrote {args.out} (head and ratio of {args.from_artifact})")
        return 0
    try:
        device = resolve_device(args.device, fall_back=False)
        if args.ratio_epochs > 0:
            check_fonts()
        data = load_mnist(args.data_dir, allow_download=False)
    except (NoGpu, MissingFonts, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    n, t0 = args.train_limit, time.perf_counter()
    base = build(to_float(data.train_images[:n]), data.train_labels[:n], args.epochs, args.seed, args.ratio_epochs,
                 args.ratio_glyphs, args.ratio_printed, args.distil_views, args.distil_teachers, device,
                 progress=not args.no_progress)
    base.save(args.out)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
