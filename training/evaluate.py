"""Evaluation of a model or a TorchScript artifact: both expose the same methods.

`vae-eval MODEL.pt` works from the artifact alone, so the numbers in a model card can
be re-derived by anyone holding only the shipped file and the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.contract import DEFAULT_ANOMALY_K, META_FILE
from app.devices import NoGpu, resolve_device
from training.calibration import calibration
from training.data import DataError, batches, binarize, load_mnist, to_float
from training.model import loss_function


@torch.no_grad()  # not inference_mode: TorchScript graphs with grad-requiring params reject inference tensors
def negative_elbo(model: Any, x: Tensor, device: torch.device, batch_size: int = 500, progress: bool = False) -> float:
    """The reference's test number: loss per data point on continuous pixels with a sampled z."""
    total = 0.0
    for xb in batches(x, batch_size, "neg-ELBO", progress):
        xb = xb.to(device)
        mu, logvar = model.encode(xb)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        total += loss_function(model.decode(z), xb, mu, logvar).item()
    return total / x.shape[0]


@torch.no_grad()  # not inference_mode: TorchScript graphs with grad-requiring params reject inference tensors
def log_likelihoods(
    model: Any, x: Tensor, k: int, device: torch.device, batch_size: int = 64, progress: bool = False
) -> Tensor:
    """Per-image IWAE lower bound on log p(x), in nats."""
    out = [model.log_likelihood(xb.to(device), k).cpu() for xb in batches(x, batch_size, f"log p(x), k={k}", progress)]
    return torch.cat(out)


def test_nll(model: Any, x: Tensor, k: int, device: torch.device, binarized: bool, seed: int = 0,
             progress: bool = False) -> float:
    """IWAE estimate of the test NLL; binarised test data uses one fixed draw so numbers are comparable."""
    torch.manual_seed(seed)
    if binarized:  # drawn on the CPU: the same fixed draw, so the same figure, on every device
        x = binarize(x.cpu(), torch.Generator().manual_seed(seed))
    return -log_likelihoods(model, x, k, device, progress=progress).mean().item()


def evaluate(model: Any, test_x: Tensor, device: torch.device, nll_k: int, binarized: bool, limit: int | None = None,
             anomaly_k: int = DEFAULT_ANOMALY_K, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    x = test_x[:limit] if limit else test_x
    torch.manual_seed(seed)
    neg_elbo = negative_elbo(model, x, device, progress=progress)
    nll = test_nll(model, x, nll_k, device, binarized, seed=seed, progress=progress)
    torch.manual_seed(seed)
    scores = -log_likelihoods(model, x, anomaly_k, device, progress=progress)
    return {
        "test_images": int(x.shape[0]),
        "neg_elbo": round(neg_elbo, 4),
        "nll": round(nll, 4),
        "nll_k": nll_k,
        "nll_data": "dynamically binarised test set (fixed seed)" if binarized else "continuous test pixels",
        "calibration": calibration(scores, anomaly_k),
    }


def labels(paths: list[Path]) -> list[str]:
    """What each artifact is called in the results and picture names: its file name, with its folder's
    where two share one. Not meta.json's `name`: a refit (vae-fit-score --out) keeps it, and compared
    beside the original it would overwrite the original's rows."""
    stems = [p.stem for p in paths]
    named = [p.stem if stems.count(p.stem) == 1 else f"{p.resolve().parent.name}-{p.stem}" for p in paths]
    return [name if named.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(named)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vae-eval", description="Evaluate TorchScript VAE artifacts on MNIST test.")
    p.add_argument("model", type=Path, nargs="+")
    p.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    p.add_argument("--k", type=int, default=1000, help="importance samples for the NLL bound")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--binarize", choices=["auto", "dynamic", "none"], default="auto",
                   help="auto: as the model was trained (from meta.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ood", action="store_true", help="anomaly-detection evaluation of every score method on the "
                   "out-of-distribution suite (anomaly/suite.py) instead of the NLL evaluation")
    p.add_argument("--ood-k", type=int, default=DEFAULT_ANOMALY_K, help="k of the scores for --ood")
    p.add_argument("--ood-n", type=int, default=2000, help="images per out-of-distribution set")
    p.add_argument("--ood-cache", type=Path, default=Path("data/ood-sets.npz"),
                   help="the built sets are cached here (rebuilt when the set definitions change)")
    p.add_argument("--pictures", type=Path, default=None, help="write failure-case pictures here (--ood)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of JSON (--ood)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = p.parse_args(argv)

    try:
        device = resolve_device(args.device, fall_back=False)
    except NoGpu as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        data = load_mnist(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    for path, label in zip(args.model, labels(args.model), strict=True):
        extra = {META_FILE: ""}
        model = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
        meta = {**json.loads(extra[META_FILE] or "{}"), "name": label}
        if args.ood:
            from anomaly.evaluate import evaluate_suite, suite

            sets = suite(data.test_images.numpy(), args.fashion_dir, args.ood_cache, args.ood_n, args.seed)
            results += evaluate_suite(model, meta, to_float(data.test_images), sets, args.ood_k, args.seed,
                                      args.pictures)
            continue
        trained_binarized = meta.get("config", {}).get("binarize") == "dynamic"
        binarized = trained_binarized if args.binarize == "auto" else args.binarize == "dynamic"
        result = evaluate(model, to_float(data.test_images), device, args.k, binarized, args.limit, seed=args.seed)
        results.append({"model": meta["name"], **result})
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.ood and args.markdown:
        from anomaly.evaluate import flagged_table, markdown

        print("AUROC\n\n" + markdown(results, "auroc") + "\n\nFPR at 95% TPR\n\n" + markdown(results, "fpr_at_95_tpr")
              + "\n\nShare flagged at the p99 threshold\n\n" + markdown(results, "flagged_at_p99") + "\n\n"
              + flagged_table(results))
    else:
        print(json.dumps(results if len(results) > 1 or args.ood else results[0], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
