"""Seconds per training epoch of the reference model: in-memory tensors vs a seed-style DataLoader.

Both loops run the same model, loss and optimiser (reference MLP, latent 20, hidden 400,
batch 128, Adam 1e-3) in the same process, one after the other:
- "in-memory": the four IDX files decoded once into a uint8 tensor; batches are sliced
  from it and converted to float per batch (what `vae-train` does);
- "DataLoader": torchvision.datasets.MNIST with transforms.ToTensor() and a per-sample
  flatten, through torch.utils.data.DataLoader (shuffle, batch 128), as pytorch/examples'
  vae/main.py does (num_workers=1 on CUDA, 0 on CPU, like the seed).

    python -m bench.train_speed --data-dir ../shared/data/mnist [--epochs 2] [--device auto]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

from app.devices import resolve_device
from training.data import FILES, load_mnist, to_float
from training.model import VAE, loss_function


def step(model: VAE, opt: torch.optim.Optimizer, xb: torch.Tensor) -> None:
    recon, mu, logvar = model(xb)
    loss = loss_function(recon, xb, mu, logvar)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def epoch_in_memory(model: VAE, opt: torch.optim.Optimizer, images: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    perm = torch.randperm(images.shape[0], device=images.device)
    for start in range(0, images.shape[0], 128):
        step(model, opt, to_float(images[perm[start : start + 128]]))
    sync(device)
    return time.perf_counter() - t0


def epoch_dataloader(model: VAE, opt: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                     device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for xb, _ in loader:
        step(model, opt, xb.to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torchvision_root(data_dir: Path, tmp: Path) -> Path:
    """torchvision's MNIST wants the uncompressed files under <root>/MNIST/raw."""
    raw = tmp / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FILES.values():
        with gzip.open(data_dir / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (after one warm-up epoch)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    device = resolve_device(args.device, fall_back=False)
    torch.manual_seed(0)
    images = load_mnist(args.data_dir, allow_download=False).train_images.to(device)
    flatten = transforms.Lambda(lambda t: t.view(-1))
    with tempfile.TemporaryDirectory() as tmp:
        dataset = datasets.MNIST(torchvision_root(args.data_dir, Path(tmp)), train=True, download=False,
                                 transform=transforms.Compose([transforms.ToTensor(), flatten]))
        kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
        loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, **kwargs)
        results = {}
        for name in ("in-memory", "DataLoader"):
            model = VAE().to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            run = (lambda m=model, o=opt: epoch_in_memory(m, o, images, device)) if name == "in-memory" else \
                  (lambda m=model, o=opt: epoch_dataloader(m, o, loader, device))
            run()  # warm-up epoch
            results[name] = [run() for _ in range(args.epochs)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"reference VAE (784-400-20), batch 128, torch {torch.__version__}, {where}")
    for name, secs in results.items():
        print(f"{name:>10}: {sum(secs) / len(secs):6.2f} s/epoch  (epochs: {', '.join(f'{s:.2f}' for s in secs)})")
    ratio = (sum(results["DataLoader"]) / sum(results["in-memory"]))
    print(f"in-memory is {ratio:.1f}x faster per epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
