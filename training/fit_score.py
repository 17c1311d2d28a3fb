"""`vae-fit-score MODEL.pt`: fit the default anomaly score (training/anomaly.py) into an existing artifact.

vae-train does this at the end of every run (`--score-epochs`); this command does it for an
artifact that was exported before, from the artifact and the data alone, without retraining the VAE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from app.contract import DEFAULT_ANOMALY_K
from app.devices import NoGpu, resolve_device
from training import export, latent_map
from training.anomaly import METHOD, RatioOptions, artifact_head, attach, reattach
from training.data import DataError, load_mnist, to_float
from training.glyph_pool import MissingFonts
from training.model import VAEBase, build
from training.train import add_ratio_options, ratio_options


def eager_vae(module: torch.jit.ScriptModule, meta: dict) -> VAEBase:
    """The trainable module back from an artifact (its own, or the `vae` inside a scored one)."""
    vae = build(meta["arch"], meta["latent_dim"], meta["hidden"])
    state = module.state_dict()
    if any(k.startswith("vae.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    vae.load_state_dict(state)
    return vae.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vae-fit-score", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--epochs", type=int, default=4, help="digit-head training epochs")
    p.add_argument("--k", type=int, default=DEFAULT_ANOMALY_K, help="importance samples of the bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="fit on the first N training images only (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: replace MODEL)")
    p.add_argument("--distil-views", type=int, default=0, metavar="N",
                   help="train the head twice, the second time taught by the first averaged over N views of "
                        "each image (17 measured: steadier, better on letters, N passes per training image; "
                        "docs/benchmarks.md)")
    p.add_argument("--distil-teachers", type=int, default=1, metavar="N",
                   help="with --distil-views: the teacher is N heads (seeds SEED..SEED+N-1), their view averages "
                        "averaged")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where the head trains (cuda for --distil-views; the rest of the fit runs on the CPU)")
    p.add_argument("--keep-head", action="store_true",
                   help="keep the artifact's trained digit head (and its seed) and refit the rest of the score around "
                        "it: the ratio's models, the latent mixture, the tails, the calibration")
    add_ratio_options(p, RatioOptions.epochs)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.distil_views < 0:
        p.error("--distil-views must be 0 (off) or more")
    if args.distil_teachers < 1:
        p.error("--distil-teachers must be 1 or more")
    try:
        device = resolve_device(args.device, fall_back=False)
        ratio = ratio_options(args.ratio_epochs, args.ratio_glyphs, args.ratio_printed)
    except (NoGpu, MissingFonts) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    module, meta = export.load(args.model)
    if args.keep_head and METHOD not in meta.get("anomaly_scores", {}).get("methods", {}):
        print(f"error: --keep-head: {args.model} has no fitted `{METHOD}` score, so no head to keep", file=sys.stderr)
        return 2
    try:
        data = load_mnist(args.data_dir, allow_download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vae = eager_vae(module, meta)
    n = args.train_limit
    train_x, train_y, test_x = to_float(data.train_images[:n]), data.train_labels[:n], to_float(data.test_images)
    if args.keep_head:
        model, meta = reattach(vae, artifact_head(module), meta, train_x, train_y, test_x, args.k,
                               progress=not args.no_progress, device=device, ratio=ratio)
    else:
        model, meta = attach(vae, meta, train_x, train_y, test_x, args.k, args.epochs, args.seed,
                             progress=not args.no_progress, distil_views=args.distil_views,
                             distil_teachers=args.distil_teachers, device=device, ratio=ratio)
    out = args.out or args.model
    lmap = latent_map.build(vae.encode, to_float(data.test_images), data.test_labels) if vae.latent_dim == 2 else None
    export.save(export.script(model), out, meta, lmap)
    reloaded, _ = export.load(out)
    diff = export.parity(model, reloaded, to_float(data.test_images[:256]))
    print(f"wrote {out} (parity {diff:.1e}); calibration p50/p99: "
          + ", ".join(f"{name} {m['calibration']['quantiles']['p50']:.2f}/{m['calibration']['quantiles']['p99']:.2f}"
                      for name, m in meta["anomaly_scores"]["methods"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
