"""`vae-fit-score MODEL.pt`: fit the default anomaly score (anomaly/score.py) into an existing artifact.

vae-train does this at the end of every run; this command does it for an artifact that was exported
before, from the artifact, the score base (anomaly/base.py) and the data, without retraining the
VAE: the latent mixture, the tails and the calibration, in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from anomaly.base import DEFAULT_PATH, MissingScoreBase, ScoreBase
from app.contract import DEFAULT_ANOMALY_K
from training import export, latent_map, neighbours
from training.data import DataError, load_mnist, to_float
from training.model import VAEBase, build


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
    p.add_argument("--score-base", type=Path, default=DEFAULT_PATH,
                   help="the score's parts that do not depend on the VAE (vae-build-score-base makes one)")
    p.add_argument("--k", type=int, default=DEFAULT_ANOMALY_K, help="importance samples of the bound")
    p.add_argument("--train-limit", type=int, default=None, help="fit on the first N training images only (smoke runs)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: replace MODEL)")
    args = p.parse_args(argv)
    try:
        base = ScoreBase.load(args.score_base)
        data = load_mnist(args.data_dir, allow_download=False)
    except (MissingScoreBase, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    module, meta = export.load(args.model)
    vae = eager_vae(module, meta)
    n = args.train_limit
    train_x, train_y, test_x = to_float(data.train_images[:n]), data.train_labels[:n], to_float(data.test_images)
    model, meta = base.attach(vae, meta, train_x, train_y, test_x, args.k)
    out = args.out or args.model
    lmap = latent_map.build(vae.encode, to_float(data.test_images), data.test_labels) if vae.latent_dim == 2 else None
    index = neighbours.build(vae.encode, data.train_images, data.train_labels)
    export.save(export.script(model), out, meta, lmap, index)
    reloaded, _ = export.load(out)
    diff = export.parity(model, reloaded, to_float(data.test_images[:256]))
    print(f"wrote {out} (parity {diff:.1e}); calibration p50/p99: "
          + ", ".join(f"{name} {m['calibration']['quantiles']['p50']:.2f}/{m['calibration']['quantiles']['p99']:.2f}"
                      for name, m in meta["anomaly_scores"]["methods"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
