"""Shared fixtures: the MNIST copy beside the repository and two tiny real artifacts.

The artifacts are trained by the real training program (1 epoch on 2,000 images), so
the API tests exercise exactly what the training side exports.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from anomaly import base as score_base
from training import train
from training.data import MNIST, load_mnist

REPO = Path(__file__).resolve().parents[1]
# Apps made by the tests (and vae-serve processes they start) leave gRPC off unless a test opens it on a
# port of its own: the default port would be shared by every app of the session.
os.environ.setdefault("VAE_GRPC_PORT", "0")
DATA_DIR = Path(os.environ.get("VAE_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "mnist"))
TEST_DATA = Path(__file__).resolve().parent / "data"

TINY_RUNS = {
    # name: extra arguments
    "vae": ["--arch", "mlp", "--latent-dim", "2", "--hidden", "64"],  # its score around the tiny base
    # an artifact as exported before the fitted score (the plain bound only): still served
    "deep-tiny": ["--arch", "deep", "--latent-dim", "8", "--hidden", "64", "--iw-k", "2", "--binarize", "dynamic",
                  "--no-score"],
}
# A score base of its own (anomaly/base.py), built from 2,000 digits in seconds: the builder is
# tested too, and the tiny model's score is fitted around it as vae-train fits one around the shipped base.
TINY_BASE = ["--train-limit", "2000", "--epochs", "1", "--ratio-epochs", "1", "--ratio-glyphs", "480",
             "--ratio-printed", "100", "--no-progress"]


@pytest.fixture(scope="session")
def mnist() -> MNIST:
    if not DATA_DIR.is_dir():
        pytest.fail(f"MNIST copy not found at {DATA_DIR} (set VAE_TEST_DATA_DIR)")
    return load_mnist(DATA_DIR, allow_download=False)


def tiny_args(out: Path, name: str) -> list[str]:
    return ["--data-dir", str(DATA_DIR), "--no-download", "--no-progress", "--epochs", "1", "--train-limit", "2000",
            "--eval-k", "16", "--eval-limit", "500", "--out", str(out / f"{name}.pt"),
            "--score-base", str(out / "score-base.pth"), *TINY_RUNS[name]]


# Mutation runs (make mutation) start a pytest session per mutant: they train the tiny models
# once into this folder and reuse them, instead of training them again every time.
CACHE = os.environ.get("VAE_TEST_ARTIFACTS")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Folder holding vae.pt and deep-tiny.pt with their metrics and pictures."""
    if CACHE and all((Path(CACHE) / f"{name}.pt").is_file() for name in TINY_RUNS):
        return Path(CACHE)
    request.getfixturevalue("mnist")  # a clear failure when the data is missing
    out = Path(CACHE) if CACHE else tmp_path_factory.mktemp("trained")
    assert score_base.main(["--data-dir", str(DATA_DIR), *TINY_BASE, "--out", str(out / "score-base.pth")]) == 0
    for name in TINY_RUNS:
        assert train.main(tiny_args(out, name)) == 0
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Path:
    """Only the artifacts, as the service expects its models folder."""
    folder = tmp_path_factory.mktemp("models")
    for p in trained.glob("*.pt"):
        shutil.copy(p, folder / p.name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vae_serve(env: dict[str, str], scheme: str = "http", verify: ssl.SSLContext | bool = True
              ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`vae-serve` as a real process with these VAE_* settings: its base URL once /readyz says
    ready, and the process; on leaving, SIGTERM, and the exit status must be 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli"], cwd=REPO,
                            env={**os.environ, "VAE_LOG_LEVEL": "warning", "VAE_DRAIN_DELAY_S": "0", **env,
                                 "VAE_PORT": str(port)})
    base = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a loaded CI machine can take a while to import torch
        while True:
            if proc.poll() is not None:
                pytest.fail(f"service exited with {proc.returncode} before becoming ready")
            try:
                if httpx.get(f"{base}/readyz", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("service did not become ready within 180 s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def bomb_png(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose header claims width x height pixels over 1,000 bytes of image data: what the pixel limit
    must refuse before decoding (the first 33 bytes are the signature and IHDR that png_header reads)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
