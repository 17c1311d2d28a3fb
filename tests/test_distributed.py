"""`vae-train` under torchrun: two CPU processes (gloo) train the same model as one process with
the same global batch and seed, and a multi-process run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.artifacts import load_model
from tests.conftest import DATA_DIR, REPO
from training.distributed import World

pytestmark = pytest.mark.slow
# --device cpu: gloo processes, also on a machine with one GPU (two NCCL ranks would need two)
ARGS = ["--data-dir", str(DATA_DIR), "--no-download", "--no-progress", "--train-limit", "4000", "--batch-size", "200",
        "--eval-k", "4", "--eval-limit", "200", "--no-score", "--latent-dim", "2", "--hidden", "64",
        "--device", "cpu"]
# The ranks draw other noise (binarisation aside, the reparameterisation's z) for the same rows than one
# process does, so the losses agree to the noise of a 4,000-image epoch, not to the bit: measured
# 0-0.5% apart over three epochs.
TOLERANCE = 0.015


def vae_train(out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "--module"] if processes > 1 else [sys.executable, "-m"]
    return subprocess.run([*launcher, "training.train", *ARGS, "--out", str(out), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=True)


def losses(metrics: Path) -> list[float]:
    return [e["train_loss"] for e in json.loads(metrics.read_text())["epochs"]]


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path: Path, mnist) -> None:
    one = vae_train(tmp_path / "one.pt", "--epochs", "3")
    two = vae_train(tmp_path / "two.pt", "--epochs", "3", processes=2)
    assert two.stdout.count("====> Epoch:") == 3  # rank 0 alone prints
    assert "processes=2 global batch=200" in two.stdout and "processes=1" in one.stdout
    single, double = losses(tmp_path / "one.metrics.json"), losses(tmp_path / "two.metrics.json")
    for a, b in zip(single, double, strict=True):
        assert abs(a - b) / a < TOLERANCE, (single, double)
    assert double[-1] < double[0] * 0.7  # and it learns
    served = load_model(tmp_path / "two.pt", torch.device("cpu"))  # the artifact keeps the service's contract
    assert served.meta["config"]["world_size"] == 2 and served.meta["config"]["batch_size"] == 200
    assert json.loads((tmp_path / "two.metrics.json").read_text())["config"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".pt", ".ckpt"}) == [
        "one.ckpt", "one.pt", "two.ckpt", "two.pt"]  # only rank 0 wrote


def test_a_multi_process_run_resumes_from_its_checkpoint(tmp_path: Path, mnist) -> None:
    vae_train(tmp_path / "r.pt", "--epochs", "2", processes=2)
    first = losses(tmp_path / "r.metrics.json")
    resumed = vae_train(tmp_path / "r.pt", "--epochs", "3", "--resume", processes=2)
    assert "resumed from" in resumed.stdout and resumed.stdout.count("====> Epoch:") == 1
    history = losses(tmp_path / "r.metrics.json")
    assert history[:2] == first and len(history) == 3 and history[2] < history[1]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_ranks_share_each_global_batch_without_overlap(size: int) -> None:
    batch = torch.arange(200)
    shares = [World(rank, size).share(batch) for rank in range(size)]
    assert sorted(torch.cat(shares).tolist()) == batch.tolist()
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
