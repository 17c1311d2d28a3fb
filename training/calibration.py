"""Calibration blocks of meta.json (their format: app/contract.py), from a model's scores on held-out images.

A leaf: training/evaluate.py (the bound's calibration) and anomaly/score.py (the fitted score's)
both use it, and neither imports the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from app.contract import CALIBRATION_PERCENTILES, calibration_block


def calibration(scores: Tensor, k: int, data: str = "MNIST test set, continuous pixels") -> dict[str, Any]:
    """Quantiles of in-distribution anomaly scores: the service turns a score into a percentile with them."""
    levels = torch.tensor(CALIBRATION_PERCENTILES, dtype=torch.float64) / 100
    q = torch.quantile(scores.double(), levels).tolist()
    return calibration_block(k, data, dict(zip(CALIBRATION_PERCENTILES, q, strict=True)),
                             float(scores.mean()), float(scores.std()), int(scores.numel()))
