"""Writes models/README.md, one model card per artifact, from the metrics JSON files.

Run after training: python scripts/model_card.py  (the numbers are never typed by hand)
"""

from __future__ import annotations

import json
from pathlib import Path

from training.export import load

MODELS = Path("models")
FLAGS = ["data_dir", "arch", "latent_dim", "hidden", "epochs", "batch_size", "lr", "schedule", "iw_k", "binarize",
         "seed", "eval_k"]


def command(config: dict, out: str) -> str:
    parts = ["vae-train"]
    for key in FLAGS:
        parts.append(f"--{key.replace('_', '-')} {config[key]}")
    return " ".join(parts) + f" --out {out}"


def distilled(fitted: dict) -> str:
    """How the head was taught, where it was distilled (vae-build-score-base --distil-views)."""
    views = fitted.get("distilled_from_views")
    if not views:
        return ""
    heads = fitted.get("distilled_from_heads", 1)
    teacher = f"{heads} heads'" if heads > 1 else "a head's"
    where = f", on {fitted['device']} with torch {fitted['torch']}" if "device" in fitted else ""
    return f", distilled from {teacher} averages over {views} views{where}"


def score_rows(artifact: Path, evaluated: dict) -> list[str]:
    """The anomaly scores the artifact serves, each with its calibration, read from the artifact itself."""
    meta = load(artifact)[1]
    block = meta.get("anomaly_scores")
    if block is None:
        q = meta["anomaly_calibration"]["quantiles"]
        return [f"| anomaly score `bound` (k={evaluated['k']}, {evaluated['n']} test images) p50 / p99 / p99.9 | "
                f"{q['p50']:.1f} / {q['p99']:.1f} / {q['p99.9']:.1f} nats |"]
    rows = []
    for name, m in block["methods"].items():
        c, q = m["calibration"], m["calibration"]["quantiles"]
        default = " (default)" if name == block["default"] else ""
        fitted = m.get("fitted_on")
        extra = (f"; head trained {fitted['head_epochs']} epochs on {fitted['head_images']:,} training digits, "
                 f"tails from {fitted['reference_images']:,} others{distilled(fitted)}" if fitted else "")
        rows.append(f"| anomaly score `{name}`{default} (k={c['k']}, calibrated on {c['n']:,} held-out test images"
                    f"{extra}) p50 / p99 / p99.9 | {q['p50']:.2f} / {q['p99']:.2f} / {q['p99.9']:.2f} |")
    return rows


def card(metrics_path: Path) -> str:
    m = json.loads(metrics_path.read_text())
    name, final, cfg = m["name"], m["final"], m["config"]
    cal = final["calibration"]
    epochs = m["epochs"]
    objective = "reference ELBO loss" if cfg["iw_k"] == 1 else f"IWAE bound, k={cfg['iw_k']}"
    lines = [
        f"## `{name}.pt`",
        "",
        f"Architecture `{cfg['arch']}`, latent {cfg['latent_dim']}, hidden {cfg['hidden']}; "
        f"objective {objective}; "
        f"pixels {'dynamically binarised' if cfg['binarize'] == 'dynamic' else 'continuous (as the reference)'}.",
        "",
        "```",
        command(cfg, f"models/{name}.pt"),
        "```",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| test negative ELBO per image (continuous pixels, sampled z) | {final['neg_elbo']:.2f} nats |",
        f"| test NLL, IWAE k={final['nll_k']}, {final['nll_data']} | **{final['nll']:.2f} nats** |",
        f"| final train / test objective | {epochs[-1]['train_loss']:.2f} / {epochs[-1]['test_loss']:.2f} |",
        f"| epochs, seconds per epoch ({m['device']}) | {len(epochs)}, {m['seconds_per_epoch']:.1f} s |",
        f"| export parity (max abs diff, eager vs reloaded) | {m['export_parity_max_abs_diff']:.1e} |",
        *score_rows(Path(m["artifact"]), cal),
        f"| torch | {m['torch_version']} |",
        "",
        "| latent space | samples | reconstructions (top: originals) |",
        "| --- | --- | --- |",
        f"| ![latent]({name}/latent.png) | ![samples]({name}/samples.png) | ![recon]({name}/reconstructions.png) |",
        "",
    ]
    if (MODELS / name / "manifold.png").is_file():
        lines += [f"Latent manifold (20x20 grid over the Gaussian quantiles): ![manifold]({name}/manifold.png)", ""]
    lines += [f"Loss curves: ![loss]({name}/loss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    metrics = sorted(MODELS.glob("*.metrics.json"), key=lambda p: (p.name != "vae.metrics.json", p.name))
    checksums = load(Path(json.loads(metrics[0].read_text())["artifact"]))[1]["dataset"]["sha256_uncompressed"]
    text = [
        "# Model cards",
        "",
        "Each artifact is a TorchScript module with `encode`, `decode`, `forward`, `log_likelihood(x, k)`,",
        "`log_likelihood_with_noise(x, eps)` and `anomaly_scores_with_noise(x, eps)` (docs/artifact.md),",
        "and a `meta.json` (read it with `GET /models` or",
        "`torch.jit.load(path, _extra_files={'meta.json': ''})`). Trained on the MNIST training set (60,000",
        "images); evaluated on the 10,000 test images. All figures below are read from the `*.metrics.json`",
        "files written by the training run (`python scripts/model_card.py` regenerates this page).",
        "",
        "The anomaly scores (`fisher`, the default, and `bound`) were fitted into the two artifacts after",
        "training, without changing the VAE's weights, their digit heads distilled on an H100 (78 s for `vae.pt`",
        "with three teachers, 44 s for `vae-2d.pt` with one; today's command for that head is",
        "`vae-build-score-base --distil-views 17 --distil-teachers 3 --device cuda`). The digit head is",
        "distilled from heads averaged over 17 views of each image, which costs an hour or more on a CPU",
        "(docs/benchmarks.md#anomaly-detection).",
        "`vae`'s head and glyph ratio now ship on their own as the score base (`models/score-base-v1.pth`,",
        "taken out of `vae.pt` with `vae-build-score-base --from-artifact models/vae.pt`): `vae-train` and",
        "`vae-fit-score` fit the rest of the score around it in about a minute, with no fonts",
        "(`vae-fit-score models/vae.pt` around it reproduces `vae.pt`'s calibration exactly).",
        "",
        "Data (SHA-256 of the uncompressed IDX files, recorded in every artifact):",
        "",
        "```",
        *[f"{v}  {k}" for k, v in checksums.items()],
        "```",
        "",
        *[card(p) for p in metrics],
    ]
    (MODELS / "README.md").write_text("\n".join(text))
    print(f"wrote {MODELS / 'README.md'}")


if __name__ == "__main__":
    main()
