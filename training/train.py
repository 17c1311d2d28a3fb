"""vae-train: train a VAE on MNIST, evaluate it, draw it, export it as TorchScript.

Read top to bottom like pytorch/examples' vae/main.py: arguments, data, the epoch
loop, then what happens to the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from anomaly.base import DEFAULT_PATH as SCORE_BASE
from anomaly.base import MissingScoreBase, ScoreBase
from app.contract import DEFAULT_ANOMALY_K, INPUT_SHAPE
from app.devices import NoGpu, resolve_device
from training import distributed, export, latent_map, neighbours, plots
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
    eval_k: int = 250  # the test NLL: k=1000 (vae-eval's) costs more than the 30 epochs of the reference MLP on a CPU
    eval_limit: int | None = None
    seed: int = 1
    device: str = "auto"
    out: Path = Path("models/vae.pt")
    resume: bool = False
    no_progress: bool = False
    score_base: Path = SCORE_BASE
    no_score: bool = False
    world_size: int = 1  # processes the run was trained with (torchrun); --batch-size is their global batch

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
    p.add_argument("--eval-k", type=int, default=d.eval_k,
                   help="importance samples for the final test NLL (vae-eval's default is 1000: closer, 4x the time)")
    p.add_argument("--eval-limit", type=int, default=None, help="final evaluation on the first N test images only")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt (written every epoch and on Ctrl-C)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument("--score-base", type=Path, default=d.score_base,
                   help="the anomaly score's parts that do not depend on the VAE (anomaly/base.py; "
                        "vae-build-score-base makes one): the run fits the rest around them")
    p.add_argument("--no-score", action="store_true", help="no fitted anomaly score: serve the plain bound")
    return TrainConfig(**vars(p.parse_args(argv)), world_size=int(os.environ.get("WORLD_SIZE", "1")))


def objective(model: VAEBase, x: Tensor, iw_k: int) -> Tensor:
    """Summed loss over the batch: the reference loss for k=1, the negative IWAE bound otherwise."""
    if iw_k == 1:
        recon, mu, logvar = model(x)
        return loss_function(recon, x, mu, logvar)
    return -model.log_likelihood(x, iw_k).sum()


class Objective(torch.nn.Module):
    """The objective as a module's forward: what DistributedDataParallel wraps, since it synchronises
    the gradients of what goes through forward() (the IWAE objective calls another method)."""

    def __init__(self, model: VAEBase, iw_k: int) -> None:
        super().__init__()
        self.model, self.iw_k = model, iw_k

    def forward(self, x: Tensor) -> Tensor:
        return objective(self.model, x, self.iw_k)


def train_epoch(model: VAEBase, loss_of: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: Tensor,
                cfg: TrainConfig, epoch: int, world: distributed.World = distributed.World()) -> float:
    """One pass over x in global batches of cfg.batch_size; this rank computes every world.size-th row
    of each. Several ranks take the order from a generator of their own, so that all draw the same
    one whatever noise each drew before; one process keeps the global generator (the shipped models'
    runs, which `make models` repeats exactly)."""
    model.train()
    if world.size == 1:
        perm = torch.randperm(x.shape[0], device=x.device)
    else:
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        perm = perm.to(x.device)
    total = 0.0
    batches = range(0, x.shape[0], cfg.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=cfg.no_progress or not world.is_main,
               unit="batch")
    for start in bar:
        xb = x[world.share(perm[start : start + cfg.batch_size])]
        if cfg.binarize == "dynamic":
            xb = binarize(xb)
        loss = loss_of(xb)
        opt.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; times world.size, that is the gradient of the loss summed
        # over the whole global batch, as one process computes it.
        (loss * world.size).backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item() / max(xb.shape[0], 1):.2f}")
    return world.sum(total, x.device) / x.shape[0]


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
                "history": history, "config": cfg.recorded(), "rng": torch.get_rng_state(),
                # on a GPU the batches' order, z and the binarisation are drawn from the CUDA generator
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}, tmp)
    tmp.replace(path)  # atomic: a Ctrl-C during the save never leaves half a checkpoint


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    name = cfg.out.stem
    try:  # now, not after the training
        base = None if cfg.no_score else ScoreBase.load(cfg.score_base)
    except MissingScoreBase as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(cfg.device, fall_back=False)
    except NoGpu as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = distributed.start(device)
    device = world.device(device)
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
    loss_of: torch.nn.Module = Objective(model, cfg.iw_k)
    if world.size > 1:  # rank 0's initial weights go to every rank; each then draws its own noise
        loss_of = DistributedDataParallel(loss_of, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + world.rank)
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
        if world.size == 1:  # RNG states are CPU byte tensors wherever map_location put the rest
            torch.set_rng_state(state["rng"].cpu())
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        else:  # one saved state for all ranks: each continues from its own seed instead
            torch.manual_seed(cfg.seed + world.rank + 1_000 * start_epoch)
        say(world, f"resumed from {ckpt} after epoch {state['epoch']}")

    n_params = sum(p.numel() for p in model.parameters())
    say(world, f"{name}: arch={cfg.arch} latent={cfg.latent_dim} hidden={cfg.hidden} params={n_params:,} "
        f"device={device} train={train_x.shape[0]} test={test_x.shape[0]} processes={world.size} "
        f"global batch={cfg.batch_size}")
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss = train_epoch(model, loss_of, opt, sched, train_x, cfg, epoch, world)
            seconds = time.perf_counter() - t0
            if not world.is_main:
                continue
            test_loss = test_epoch(model, test_target, cfg)
            history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "test_loss": round(test_loss, 4),
                            "seconds": round(seconds, 2)})
            print(f"====> Epoch: {epoch} Average loss: {train_loss:.4f}  Test set loss: {test_loss:.4f}  "
                  f"({seconds:.1f}s)", flush=True)
            save_checkpoint(ckpt, model, opt, sched, epoch, history, cfg)
    except KeyboardInterrupt:
        if world.is_main:
            # The interrupted epoch's partial updates are kept; --resume repeats that epoch from them.
            save_checkpoint(ckpt, model, opt, sched,
                            epoch - 1 if history and history[-1]["epoch"] != epoch else epoch, history, cfg)
            print(f"\ninterrupted: checkpoint saved to {ckpt}; continue with the same command plus --resume",
                  file=sys.stderr)
        return 130
    distributed.stop(world)
    if not world.is_main:
        return 0

    train_y = data.train_labels[: cfg.train_limit]
    finish(model, cfg, name, data.sha256, (train_x, train_y), test_x, data.test_labels, history, device, base)
    return 0


def say(world: distributed.World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def finish(model: VAEBase, cfg: TrainConfig, name: str, sha256: dict[str, str], train: tuple[Tensor, Tensor],
           test_x: Tensor, test_labels: Tensor, history: list[dict[str, Any]], device: torch.device,
           base: ScoreBase | None) -> None:
    """Evaluate, fit the anomaly score, export, verify the export, draw, and write the metrics; each phase's
    time is printed (bench/train_time.py reads them)."""
    model.eval()
    train_x, train_y = train
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
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
    phases["evaluation"] = time.perf_counter() - t0
    served: torch.nn.Module = model
    if base is not None:
        t0 = time.perf_counter()
        print("fitting the anomaly score around its base ...", flush=True)
        calib_x = test_x[: cfg.eval_limit] if cfg.eval_limit else test_x
        served, meta = base.attach(model, meta, train_x, train_y, calib_x, DEFAULT_ANOMALY_K)
        phases["anomaly score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The test set's means, once: for the latent picture, and (2-D models) the page's latent map.
    model = model.cpu()
    mu = latent_map.means(model.encode, test_x.cpu())
    lmap = latent_map.block(mu, test_labels.cpu()) if cfg.latent_dim == 2 else None
    index = neighbours.build(model.encode, train_x.cpu().mul(255).round().to(torch.uint8).reshape(-1, 28, 28),
                             train_y.cpu())
    export.save(export.script(served), cfg.out, meta, lmap, index)
    reloaded, _ = export.load(cfg.out)
    diff = export.parity(served, reloaded, test_x[:256].cpu())
    if diff > 1e-5:
        raise SystemExit(f"error: exported artifact differs from the eager model by {diff:.2e} (> 1e-5)")

    phases["export and check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pictures = cfg.out.with_suffix("")  # models/vae.pt -> models/vae/
    pictures.mkdir(parents=True, exist_ok=True)
    plots.latent_scatter(mu, test_labels, pictures / "latent.png", name)
    if cfg.latent_dim == 2:
        plots.manifold(model, pictures / "manifold.png")
    plots.samples(model, cfg.latent_dim, pictures / "samples.png")
    plots.reconstructions(model, test_x.cpu(), pictures / "reconstructions.png")
    plots.loss_curves(history, pictures / "loss.png", name)
    phases["pictures"] = time.perf_counter() - t0

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
    print("end phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), flush=True)
    print(f"test neg-ELBO {metrics['neg_elbo']:.2f}, test NLL (k={cfg.eval_k}) {metrics['nll']:.2f} nats; "
          f"wrote {cfg.out}, {cfg.out.with_suffix('.metrics.json')} and {pictures}/*.png")


if __name__ == "__main__":
    sys.exit(main())
