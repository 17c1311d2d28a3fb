"""vae-train: train a VAE on MNIST, evaluate it, draw it, export it as TorchScript.

Read top to bottom like pytorch/examples' vae/main.py: arguments, data, the epoch
loop, then what happens to the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from app.contract import DEFAULT_ANOMALY_K, INPUT_SHAPE
from app.devices import NoGpu, resolve_device
from training import anomaly, export, plots
from training.data import DataError, binarize, load_mnist, to_float
from training.evaluate import evaluate
from training.model import VAEBase, build, loss_function


@dataclass(frozen=True)
class TrainConfig:
    """One training run, as the command line gave it; recorded in the checkpoint, the metrics and meta.json."""

    data_dir: Path = Path("data/mnist")
    no_download: bool = False
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "constant"
    latent_dim: int = 20
    hidden: int = 400
    arch: str = "mlp"
    iw_k: int = 1
    binarize: str = "none"
    train_limit: int | None = None
    eval_k: int = 1000
    eval_limit: int | None = None
    seed: int = 1
    device: str = "auto"
    out: Path = Path("models/vae.pt")
    resume: bool = False
    no_progress: bool = False
    score_epochs: int = 4

    def recorded(self) -> dict[str, Any]:
        """What the model depends on: the flags that only steer this process (paths, bars, resuming) left out."""
        skip = {"resume", "no_progress", "no_download", "out"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="vae-train", description="Train a VAE on MNIST and export it as TorchScript.")
    p.add_argument("--data-dir", type=Path, default=d.data_dir,
                   help="folder with the four MNIST IDX files (.gz or not); downloaded there if missing and online")
    p.add_argument("--no-download", action="store_true", help="never try to download missing data")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=["constant", "cosine"], default=d.schedule,
                   help="learning rate: constant (reference) or cosine decay to zero over the run")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--arch", choices=["mlp", "deep"], default=d.arch,
                   help="mlp: the reference 784-hidden-latent MLP; deep: two hidden layers each side")
    p.add_argument("--iw-k", type=int, default=d.iw_k,
                   help="importance samples in the training objective: 1 = the reference ELBO loss, >1 = IWAE bound")
    p.add_argument("--binarize", choices=["dynamic", "none"], default=d.binarize,
                   help="dynamic: resample binary pixels every batch; none: continuous pixels (reference)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--eval-k", type=int, default=d.eval_k, help="importance samples for the final test NLL")
    p.add_argument("--eval-limit", type=int, default=None, help="final evaluation on the first N test images only")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt (written every epoch and on Ctrl-C)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument("--score-epochs", type=int, default=d.score_epochs,
                   help="epochs of the anomaly score's outlier head (training/anomaly.py); 0: serve the plain bound")
    return TrainConfig(**vars(p.parse_args(argv)))


def objective(model: VAEBase, x: Tensor, iw_k: int) -> Tensor:
    """Summed loss over the batch: the reference loss for k=1, the negative IWAE bound otherwise."""
    if iw_k == 1:
        recon, mu, logvar = model(x)
        return loss_function(recon, x, mu, logvar)
    return -model.log_likelihood(x, iw_k).sum()


def train_epoch(model: VAEBase, opt: torch.optim.Optimizer, sched: Any, x: Tensor, cfg: TrainConfig,
                epoch: int) -> float:
    model.train()
    perm = torch.randperm(x.shape[0], device=x.device)
    total = 0.0
    batches = range(0, x.shape[0], cfg.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=cfg.no_progress, unit="batch")
    for start in bar:
        xb = x[perm[start : start + cfg.batch_size]]
        if cfg.binarize == "dynamic":
            xb = binarize(xb)
        loss = objective(model, xb, cfg.iw_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item() / xb.shape[0]:.2f}")
    return total / x.shape[0]


@torch.no_grad()
def test_epoch(model: VAEBase, x: Tensor, cfg: TrainConfig) -> float:
    """The training objective on the test set (sampled z, like the reference's test loss)."""
    model.train()  # sample z as the objective does; no dropout/batch-norm, so nothing else changes
    total = sum(objective(model, x[s : s + 1000], cfg.iw_k).item() for s in range(0, x.shape[0], 1000))
    model.eval()
    return total / x.shape[0]


def checkpoint_path(out: Path) -> Path:
    return out.with_suffix(".ckpt")


def save_checkpoint(path: Path, model: VAEBase, opt: torch.optim.Optimizer, sched: Any, epoch: int,
                    history: list[dict[str, Any]], cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict() if sched is not None else None, "epoch": epoch,
                "history": history, "config": cfg.recorded(), "rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # atomic: a Ctrl-C during the save never leaves half a checkpoint


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    name = cfg.out.stem
    try:
        device = resolve_device(cfg.device, fall_back=False)
    except NoGpu as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)

    try:
        data = load_mnist(cfg.data_dir, allow_download=not cfg.no_download)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_x = to_float(data.train_images[: cfg.train_limit]).to(device)
    test_x = to_float(data.test_images).to(device)
    test_target = binarize(test_x, torch.Generator(device).manual_seed(0)) if cfg.binarize == "dynamic" else test_x

    model = build(cfg.arch, cfg.latent_dim, cfg.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(train_x.shape[0] / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cfg.schedule == "cosine" else None
    history: list[dict[str, Any]] = []
    start_epoch = 1
    ckpt = checkpoint_path(cfg.out)
    if cfg.resume:
        if not ckpt.is_file():
            print(f"error: --resume but no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if sched is not None and state["sched"] is not None:
            sched.load_state_dict(state["sched"])
        history, start_epoch = state["history"], state["epoch"] + 1
        torch.set_rng_state(state["rng"])
        print(f"resumed from {ckpt} after epoch {state['epoch']}")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: arch={cfg.arch} latent={cfg.latent_dim} hidden={cfg.hidden} params={n_params:,} "
          f"device={device} train={train_x.shape[0]} test={test_x.shape[0]}")
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss = train_epoch(model, opt, sched, train_x, cfg, epoch)
            seconds = time.perf_counter() - t0
            test_loss = test_epoch(model, test_target, cfg)
            history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "test_loss": round(test_loss, 4),
                            "seconds": round(seconds, 2)})
            print(f"====> Epoch: {epoch} Average loss: {train_loss:.4f}  Test set loss: {test_loss:.4f}  "
                  f"({seconds:.1f}s)", flush=True)
            save_checkpoint(ckpt, model, opt, sched, epoch, history, cfg)
    except KeyboardInterrupt:
        # The interrupted epoch's partial updates are kept; --resume repeats that epoch from them.
        save_checkpoint(ckpt, model, opt, sched, epoch - 1 if history and history[-1]["epoch"] != epoch else epoch,
                        history, cfg)
        print(f"\ninterrupted: checkpoint saved to {ckpt}; continue with the same command plus --resume",
              file=sys.stderr)
        return 130

    train_y = data.train_labels[: cfg.train_limit]
    finish(model, cfg, name, data.sha256, (train_x, train_y), test_x, data.test_labels, history, device)
    return 0


def finish(model: VAEBase, cfg: TrainConfig, name: str, sha256: dict[str, str], train: tuple[Tensor, Tensor],
           test_x: Tensor, test_labels: Tensor, history: list[dict[str, Any]], device: torch.device) -> None:
    """Evaluate, fit the anomaly score, export, verify the export, draw, and write the metrics."""
    model.eval()
    train_x, train_y = train
    print("evaluating on the test set ...", flush=True)
    metrics = evaluate(model, test_x, device, cfg.eval_k, cfg.binarize == "dynamic", cfg.eval_limit,
                       anomaly_k=DEFAULT_ANOMALY_K, progress=not cfg.no_progress)
    meta = {
        "name": name,
        "arch": cfg.arch,
        "latent_dim": cfg.latent_dim,
        "hidden": cfg.hidden,
        "input_shape": INPUT_SHAPE,
        "likelihood": "bernoulli",
        "pixels": "float32 in [0, 1], white digit on black background (MNIST convention)",
        "config": cfg.recorded(),
        "dataset": {"name": "MNIST", "sha256_uncompressed": sha256},
        "metrics": {k: v for k, v in metrics.items() if k != "calibration"},
        "anomaly_calibration": metrics["calibration"],
        "torch_version": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    served: torch.nn.Module = model
    if cfg.score_epochs > 0:
        print("fitting the anomaly score ...", flush=True)
        calib_x = test_x[: cfg.eval_limit] if cfg.eval_limit else test_x
        served, meta = anomaly.attach(model, meta, train_x, train_y, calib_x, DEFAULT_ANOMALY_K, cfg.score_epochs,
                                      cfg.seed, progress=not cfg.no_progress)
    export.save(export.script(served), cfg.out, meta)
    reloaded, _ = export.load(cfg.out)
    diff = export.parity(served, reloaded, test_x[:256].cpu())
    if diff > 1e-5:
        raise SystemExit(f"error: exported artifact differs from the eager model by {diff:.2e} (> 1e-5)")

    pictures = cfg.out.with_suffix("")  # models/vae.pt -> models/vae/
    pictures.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    mu, _ = model.encode(test_x.cpu())
    plots.latent_scatter(mu.detach(), test_labels, pictures / "latent.png", name)
    if cfg.latent_dim == 2:
        plots.manifold(model, pictures / "manifold.png")
    plots.samples(model, cfg.latent_dim, pictures / "samples.png")
    plots.reconstructions(model, test_x.cpu(), pictures / "reconstructions.png")
    plots.loss_curves(history, pictures / "loss.png", name)

    seconds = [h["seconds"] for h in history]
    report = {
        "name": name,
        "artifact": str(cfg.out),
        "config": cfg.recorded(),
        "epochs": history,
        "final": metrics,
        "seconds_per_epoch": round(sum(seconds) / max(len(seconds), 1), 2),
        "export_parity_max_abs_diff": diff,
        "torch_version": torch.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "pictures": sorted(str(p) for p in pictures.glob("*.png")),
    }
    cfg.out.with_suffix(".metrics.json").write_text(json.dumps(report, indent=2))
    print(f"test neg-ELBO {metrics['neg_elbo']:.2f}, test NLL (k={cfg.eval_k}) {metrics['nll']:.2f} nats; "
          f"wrote {cfg.out}, {cfg.out.with_suffix('.metrics.json')} and {pictures}/*.png")


if __name__ == "__main__":
    sys.exit(main())
