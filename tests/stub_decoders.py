"""Stand-in decoders for tests/test_decoders.py, in a module of their own: a decoder process imports
the module of the function it runs, and this one must load within the process's memory limit
(torch alone maps more address space than the limit allows)."""

from __future__ import annotations

import os
import time

import numpy as np

from app.decoders import memory_budget
from app.preprocess import Preprocess


def pid_or_hang(blobs: list[bytes], max_pixels: int, prep: Preprocess) -> np.ndarray:
    """Hangs on b"hang" (a C decoder on a scan bomb cannot be interrupted either), allocates twice the
    process's memory budget on b"allocate", else answers with its process id."""
    if blobs == [b"hang"]:
        time.sleep(600)
    if blobs == [b"allocate"]:
        np.ones(memory_budget(max_pixels) * 2, np.uint8)
    return np.array([os.getpid()])
