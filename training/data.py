"""MNIST as in-memory tensors.

The four IDX files are decoded once into uint8 tensors (60k x 28 x 28 is 47 MB);
batches are then sliced from memory, which is what keeps a 2-core CPU busy with
the model instead of with per-sample PIL transforms.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Expected leading dimensions; a file that parses but disagrees is corrupt.
SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}


class DataError(Exception):
    """The data folder cannot give us MNIST; the message is meant for the user verbatim."""


@dataclass
class MNIST:
    train_images: torch.Tensor  # uint8 [60000, 28, 28]
    train_labels: torch.Tensor  # int64 [60000]
    test_images: torch.Tensor  # uint8 [10000, 28, 28]
    test_labels: torch.Tensor  # int64 [10000]
    sha256: dict[str, str]  # of the uncompressed files, as published with the dataset
    folder: str


def _find(folder: Path, stem: str) -> Path | None:
    # Accept the flat layout (../shared/data/mnist) and torchvision's <root>/MNIST/raw.
    for base in (folder, folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def _missing_message(folder: Path) -> str:
    names = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    return f"MNIST not found in {folder}: expected the four IDX files {names}"


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Decode an IDX file (the format MNIST ships in): magic 0x0000 0x08 ndim, sizes, uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{name}: IDX header says {expected} bytes, file has {len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"{path}: cannot read ({e})") from e


def download(folder: Path) -> None:
    """Fetch MNIST with torchvision into <folder>/MNIST/raw (the online path)."""
    from torchvision.datasets import MNIST as TorchvisionMNIST

    try:
        TorchvisionMNIST(root=str(folder), train=True, download=True)
        TorchvisionMNIST(root=str(folder), train=False, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError depending on what failed
        raise DataError(f"{_missing_message(folder)}; download failed ({type(e).__name__})") from e


def load_mnist(folder: str | Path, allow_download: bool = True) -> MNIST:
    folder = Path(folder).expanduser()
    paths = {key: _find(folder, stem) for key, stem in FILES.items()}
    if any(p is None for p in paths.values()):
        if not allow_download:
            raise DataError(_missing_message(folder))
        download(folder)
        paths = {key: _find(folder, stem) for key, stem in FILES.items()}
        if any(p is None for p in paths.values()):
            raise DataError(_missing_message(folder))

    arrays: dict[str, np.ndarray] = {}
    sha: dict[str, str] = {}
    for key, path in paths.items():
        assert path is not None
        raw = read_bytes(path)
        sha[FILES[key]] = hashlib.sha256(raw).hexdigest()
        arr = parse_idx(raw, str(path))
        if arr.shape != SHAPES[key]:
            raise DataError(f"{path}: shape {arr.shape}, expected {SHAPES[key]} (corrupt or not MNIST)")
        arrays[key] = arr
    return MNIST(
        train_images=torch.from_numpy(arrays["train_images"].copy()),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["test_images"].copy()),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        sha256=sha,
        folder=str(folder),
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1], the artifact's input convention."""
    return images.unsqueeze(1).float().div_(255.0)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: each pixel ~ Bernoulli(intensity), fresh every time it is seen."""
    return torch.bernoulli(x, generator=generator)


def batches(x: torch.Tensor, batch_size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    """Consecutive slices of an in-memory tensor, with a progress bar on long evaluations."""
    starts = range(0, x.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress, unit="batch"):
        yield x[start : start + batch_size]
