"""Performance wiring that is not part of any request: torch thread counts and the GC freeze.

Why each choice, with figures: docs/benchmarks.md#serving.
"""

from __future__ import annotations

import gc
import os

import torch


def thread_counts(setting: int, device: torch.device, workers: int = 1) -> tuple[int, int]:
    """torch intra-op threads for (event-loop passes, compute-thread passes); 0 keeps torch's default.

    Set once, before the first pass: changing the count at run time (to give the compute
    thread its cores back while it works) left every later pass slower. On CPU, every core
    of this worker's share for the event loop's short passes and one less for the compute
    thread, so its OpenMP team does not compete with the event loop; VAE_THREADS=1 suits
    traffic dominated by large anomaly scores. Several workers split the cores between them:
    oversubscribed OpenMP teams were measured to halve throughput.
    """
    if setting:
        return setting, setting
    if device.type != "cpu":
        return 0, 0
    cores = max(1, (os.cpu_count() or 1) // workers)
    return cores, max(1, cores - 1)


def set_event_loop_threads(count: int) -> None:
    """Before any pass: OpenMP's team size is per calling thread, and this one runs the short passes."""
    if count:
        torch.set_num_threads(count)


def freeze_startup_objects() -> None:
    """Everything loaded at start-up lives as long as the process: move it out of the garbage
    collector's sight, or each full collection walks all of them: a stall seen at p99
    (docs/benchmarks.md#serving)."""
    gc.collect()
    gc.freeze()


def unfreeze() -> None:
    gc.unfreeze()
