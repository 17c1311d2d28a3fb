"""`vae-index MODEL.pt`: write the nearest-neighbour index of the MNIST training set into an artifact
(app/contract.py's `neighbours.npz`), which `POST /similar` searches.

The index is the 60,000 training digits' posterior means under the artifact's own encoder, with
their labels and pixels (the PNG answer shows the neighbours themselves). vae-train and
vae-fit-score write it into every artifact they export; this command adds it to one exported
before, from the artifact and the data alone: the weights and other files are saved back unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from app.contract import LATENT_MAP_FILE, NEIGHBOURS_FILE, neighbours, neighbours_file
from training import export, latent_map
from training.data import DataError, load_mnist, to_float

DATA = "MNIST training set: posterior means, labels, images"


def build(encode: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor, labels: Tensor) -> bytes:
    """`neighbours.npz` for uint8 images [N, 28, 28] and their labels, encoded with `encode`."""
    mu = latent_map.means(encode, to_float(images))
    return neighbours_file(mu.numpy(), labels.numpy(), images.numpy(), DATA)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vae-index", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--out", type=Path, default=None, help="where to write (default: replace MODEL)")
    args = p.parse_args(argv)
    module, meta = export.load(args.model)
    try:
        data = load_mnist(args.data_dir, allow_download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        index = build(module.encode, data.train_images, data.train_labels)
    lmap = export.extra_file(args.model, LATENT_MAP_FILE)
    out = args.out or args.model
    export.save(module, out, meta, json.loads(lmap) if lmap else None, index)
    mu, labels, _ = neighbours(export.extra_file(out, NEIGHBOURS_FILE) or b"", meta["latent_dim"])
    print(f"wrote {out}: {len(mu)} training digits ({np.bincount(labels, minlength=10).tolist()} per digit), "
          f"{len(index) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
