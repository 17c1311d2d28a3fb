"""Which torch device to run on, for the service and the training program alike."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("app.devices")


class NoGpu(RuntimeError):
    """CUDA was asked for on a machine without it, by a caller that must not fall back."""


def resolve_device(setting: str, fall_back: bool = True) -> torch.device:
    """`auto`: CUDA when torch sees a GPU, else the CPU.

    `cuda` without a GPU: the service falls back to the CPU with a warning (a GPU-less host
    still serves, slower, instead of crash-looping); training (`fall_back=False`) refuses,
    because hours on the CPU instead of minutes on a GPU is never what was meant.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        if not fall_back:
            raise NoGpu(f"device {setting!r} asked for, but torch.cuda.is_available() is False")
        log.warning("VAE_DEVICE=%s but no CUDA device is available; falling back to CPU", setting)
        return torch.device("cpu")
    return torch.device(setting)
