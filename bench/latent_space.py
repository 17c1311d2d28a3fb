"""What the shipped models' latent spaces are worth: is a sample of "a 3" a 3, and are a digit's
nearest codes the same digit?

1. `GET /sample?digit=D`: for each model and digit, n samples at several temperatures, drawn as
   the service draws them (the artifact's `digit_gaussians`, the decoder's Bernoulli means), and
   named by two judges that never saw the sample: the artifact's own digit head (the CNN of its
   anomaly score, trained on MNIST's training digits) and a 1-nearest-neighbour classifier on
   MNIST's 60,000 training images' pixels. The share each judge names as D.
2. The k-NN label accuracy of the latent space (`POST /similar`'s index): each MNIST test digit's
   posterior mean, labelled by a majority of its k nearest training means (k = 1, 5, 10): the
   standard measure of how well a representation separates the classes.
3. What the index costs the service: its size in memory and the artifact's load time with it.

    python -m bench.latent_space [--models models/vae.pt models/vae-2d.pt] [--n 200]
    python -m bench.latent_space --picture docs/interpolate-paths.png   # linear and slerp, 7 to 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from app.artifacts import load_model
from app.contract import LATENT_MAP_FILE, NEIGHBOURS_FILE, neighbours
from app.inference import path_between
from app.neighbours import NeighbourIndex
from training import export
from training.data import load_mnist, to_float

TEMPERATURES = (1.0, 0.8, 0.5)
TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


@torch.no_grad()
def digit_samples(module: torch.jit.ScriptModule, digit: int, n: int, temperature: float, seed: int) -> torch.Tensor:
    """What GET /sample?digit=&n=&temperature=&seed= decodes (app/inference.py's Engine.sample)."""
    means, trils = module.digit_gaussians()
    z = torch.randn(n, means.shape[1], generator=torch.Generator().manual_seed(seed)) * temperature
    return module.decode(means[digit] + z @ trils[digit].T)


@torch.no_grad()
def head_says(module: torch.jit.ScriptModule, x: torch.Tensor) -> np.ndarray:
    """The artifact's digit head: the most likely of the ten digits (its eleventh class, "broken", left out)."""
    return module.head(x)[:, :10].argmax(1).numpy()


def nearest(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The labels of each query's k nearest training rows (Euclidean), nearest first: the search POST /similar
    runs (app/neighbours.py), on any vectors."""
    index = NeighbourIndex(train.astype(np.float32), labels, np.zeros((0, 28, 28), np.uint8), torch.device("cpu"))
    flat = queries.astype(np.float32).reshape(len(queries), -1)
    rows = [index.search(torch.from_numpy(flat[i : i + 500]), k).index.numpy() for i in range(0, len(flat), 500)]
    return labels[np.concatenate(rows)]


def nearest_pixels_says(train: torch.Tensor, labels: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """1-nearest neighbour among the training images, Euclidean on pixels in [0, 1]."""
    return nearest(train.reshape(len(train), -1).numpy(), labels, x.numpy(), 1)[:, 0]


def knn_accuracy(train_mu: np.ndarray, train_y: np.ndarray, test_mu: np.ndarray, test_y: np.ndarray,
                 ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    near = nearest(train_mu, train_y, test_mu, max(ks))
    out = {}
    for k in ks:
        pred = np.array([np.bincount(v, minlength=10).argmax() for v in near[:, :k]])  # ties: the smaller digit
        out[k] = float((pred == test_y).mean())
    return out


@torch.no_grad()
def paths_picture(module: torch.jit.ScriptModule, ends: list[Path], out: Path, steps: int = 10) -> None:
    """Both paths between two images' codes, one row each (linear above, slerp below), labelled."""
    x = to_float(torch.from_numpy(np.stack([np.asarray(Image.open(e).convert("L")) for e in ends])))
    mu = module.encode(x)[0]
    rows = [(name, module.decode(path_between(mu[0], mu[1], steps, name))) for name in ("linear", "slerp")]
    scale, label_w = 3, 70
    canvas = Image.new("L", (label_w + steps * 30 * scale, 2 * 30 * scale), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        draw.text((6, r * 30 * scale + 40), name, fill=0)
        for i, img in enumerate(images[:, 0].mul(255).round().byte().numpy()):
            tile = Image.fromarray(img).resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + i * 30 * scale, r * 30 * scale + scale))
        norms = path_between(mu[0], mu[1], steps, name).norm(dim=1)
        print(f"{name}: |z| along the path " + " ".join(f"{v:.2f}" for v in norms.tolist()))
    canvas.save(out)
    print(f"wrote {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs="+", default=[Path("models/vae.pt"), Path("models/vae-2d.pt")])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--n", type=int, default=200, help="samples per digit and temperature")
    p.add_argument("--picture", type=Path, default=None, help="write the linear and slerp paths from a 7 to a 2 "
                   "(the first model) here, e.g. docs/interpolate-paths.png, and stop")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.picture:
        paths_picture(export.load(args.models[0])[0], [TEST_DATA / "mnist_test_0_digit_7.png",
                                                       TEST_DATA / "mnist_test_1_digit_2.png"], args.picture)
        return 0
    data = load_mnist(args.data_dir, allow_download=False)
    train_x, train_y = to_float(data.train_images), data.train_labels.numpy()
    test_x, test_y = to_float(data.test_images), data.test_labels.numpy()
    for path in args.models:
        module, meta = export.load(path)
        name = meta["name"]
        print(f"## {name} ({meta['latent_dim']}-D latent)\n")
        print("| judge | T | " + " | ".join(str(d) for d in range(10)) + " | lowest |")
        print("|" + " --- |" * 13)
        for t in TEMPERATURES:
            named = {"digit head": [], "1-NN on pixels": []}
            for digit in range(10):
                x = digit_samples(module, digit, args.n, t, seed=digit)
                named["digit head"].append(float((head_says(module, x) == digit).mean()))
                named["1-NN on pixels"].append(float((nearest_pixels_says(train_x, train_y, x) == digit).mean()))
            for judge, shares in named.items():
                print(f"| {judge} | {t:g} | " + " | ".join(f"{s:.0%}" for s in shares) + f" | {min(shares):.0%} |",
                      flush=True)
        test_mu = torch.cat([module.encode(xb)[0] for xb in test_x.split(1000)]).numpy()
        index = export.extra_file(path, NEIGHBOURS_FILE)
        if index is None:
            print(f"\n{path} has no neighbour index (vae-index adds one)\n")
            continue
        train_mu, labels, _ = neighbours(index, meta["latent_dim"])
        acc = knn_accuracy(train_mu, labels, test_mu, test_y)
        print("\nk-NN label accuracy of the test set's posterior means among the training set's: "
              + ", ".join(f"k={k} {a:.2%}" for k, a in acc.items()))
        lmap = export.extra_file(path, LATENT_MAP_FILE)
        with tempfile.TemporaryDirectory() as folder:  # the same artifact without its index, for the start-up cost
            bare = Path(folder) / path.name
            export.save(module, bare, meta, json.loads(lmap) if lmap else None)
            seconds = {}
            for label, file in (("with", path), ("without", bare)):
                start = time.perf_counter()
                served = load_model(file, torch.device("cpu"))
                seconds[label] = time.perf_counter() - start
        served = load_model(path, torch.device("cpu"))
        assert served.index is not None
        print(f"index: {len(served.index)} digits, {served.index.nbytes / 1e6:.1f} MB of codes in memory and "
              f"{served.index.images.nbytes / 1e6:.1f} MB of images (one copy per process), "
              f"{len(index) / 1e6:.1f} MB in the artifact; the artifact loads and passes its checks in "
              f"{seconds['with']:.2f} s with it, {seconds['without']:.2f} s without\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
