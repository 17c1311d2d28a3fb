"""`vae-latent-map MODEL.pt`: write the test set's 2-D latent map into an artifact (app/contract.py's
`latent_map.json`), which the page at `/` draws and the service serves at `/models/{name}/latent-map`.

vae-train writes it into every 2-D artifact it exports; this command adds it to one exported
before, from the artifact and the data alone: the weights and meta.json are saved back unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.contract import LATENT_MAP_FILE, META_FILE, NEIGHBOURS_FILE, latent_map, latent_map_block
from training import export
from training.data import DataError, load_mnist, to_float

DATA = "MNIST test set, posterior means"


def block(mu: Tensor, labels: Tensor) -> dict[str, Any]:
    """The map of the test set's posterior means [N,2] with their digits."""
    return latent_map_block(mu.tolist(), labels.tolist(), DATA)


@torch.no_grad()
def means(encode: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor, batch: int = 1000) -> Tensor:
    """Posterior means of float images [N,1,28,28], encoded in batches (the same batches wherever a map is
    made, so that the training program and vae-latent-map write the same numbers)."""
    return torch.cat([encode(images[i:i + batch])[0] for i in range(0, len(images), batch)])


def build(encode: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor, labels: Tensor) -> dict[str, Any]:
    return block(means(encode, images), labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vae-latent-map", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--out", type=Path, default=None, help="where to write (default: replace MODEL)")
    args = p.parse_args(argv)
    module, meta = export.load(args.model)
    if meta.get("latent_dim") != 2:
        print(f"error: {args.model} has latent_dim {meta.get('latent_dim')}; a latent map is for 2-D models",
              file=sys.stderr)
        return 2
    try:
        data = load_mnist(args.data_dir, allow_download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    block = build(module.encode, to_float(data.test_images), data.test_labels)
    out = args.out or args.model
    export.save(module, out, meta, block, export.extra_file(args.model, NEIGHBOURS_FILE))
    check = {META_FILE: "", LATENT_MAP_FILE: ""}
    torch.jit.load(str(out), map_location="cpu", _extra_files=check)
    latent_map(json.loads(check[LATENT_MAP_FILE]), meta["latent_dim"])
    x0, x1, y0, y1 = block["extent"]
    print(f"wrote {out}: {block['n']} test-set means, z[0] in [{x0}, {x1}], z[1] in [{y0}, {y1}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
