"""TorchScript export: the trained module plus its self-description in one file.

The service needs nothing but this file: methods for the contract, and `meta.json`
(shape, latent size, likelihood, calibration) packed next to the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.contract import LATENT_MAP_FILE, META_FILE, NEIGHBOURS_FILE
from training.model import VAEBase


def script(model: nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(model.cpu().eval())


def save(scripted: torch.jit.ScriptModule, path: Path, meta: dict[str, Any],
         latent_map: dict[str, Any] | None = None, neighbours: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, str | bytes] = {META_FILE: json.dumps(meta, indent=2)}
    if latent_map is not None:
        extra[LATENT_MAP_FILE] = json.dumps(latent_map, separators=(",", ":"))
    if neighbours is not None:
        extra[NEIGHBOURS_FILE] = neighbours
    torch.jit.save(scripted, str(path), _extra_files=extra)


def extra_file(path: Path, name: str) -> bytes | None:
    """One extra file of an artifact as it was saved, or None if it has none: what a command that rewrites
    one of them keeps of the others."""
    extra = {name: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return extra[name] or None  # type: ignore[return-value]


def load(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[META_FILE])


@torch.no_grad()
def parity(eager: VAEBase, reloaded: torch.jit.ScriptModule, x: Tensor) -> float:
    """Max abs difference between eager and reloaded artifact over encode, decode and log_likelihood."""
    eager = eager.cpu().eval()
    diffs = []
    mu_e, lv_e = eager.encode(x)
    mu_s, lv_s = reloaded.encode(x)
    diffs += [(mu_e - mu_s).abs().max(), (lv_e - lv_s).abs().max()]
    diffs.append((eager.decode(mu_e) - reloaded.decode(mu_e)).abs().max())
    torch.manual_seed(0)
    ll_e = eager.log_likelihood(x, 8)
    torch.manual_seed(0)
    ll_s = reloaded.log_likelihood(x, 8)
    # log-likelihoods are O(100) nats: compare relative to that scale.
    diffs.append(((ll_e - ll_s).abs() / ll_e.abs().clamp_min(1.0)).max())
    return float(torch.stack(diffs).max())
