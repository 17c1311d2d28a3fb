from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR
from training import train
from training.data import FILES, DataError, load_mnist, parse_idx

README_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}


def test_loads_the_shared_copy_with_published_checksums(mnist) -> None:
    assert tuple(mnist.train_images.shape) == (60000, 28, 28)
    assert tuple(mnist.test_images.shape) == (10000, 28, 28)
    assert set(mnist.test_labels.tolist()) == set(range(10))
    for name, digest in README_SHA256.items():
        assert mnist.sha256[name] == digest


def test_uncompressed_files_in_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FILES.values():
        with gzip.open(DATA_DIR / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    data = load_mnist(tmp_path, allow_download=False)
    assert int(data.test_labels[0]) == 7


def test_missing_data_exits_2_naming_folder_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main(["--data-dir", str(tmp_path), "--no-download", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(tmp_path) in err
    for stem in FILES.values():
        assert stem in err


@pytest.mark.parametrize("damage", ["truncate", "not-gzip"])
def test_corrupt_file_exits_2_with_clear_error(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    for stem in FILES.values():
        shutil.copy(DATA_DIR / f"{stem}.gz", tmp_path / f"{stem}.gz")
    victim = tmp_path / "t10k-images-idx3-ubyte.gz"
    if damage == "truncate":
        with gzip.open(DATA_DIR / "t10k-images-idx3-ubyte.gz") as f:
            victim.write_bytes(gzip.compress(f.read()[:5000]))
    else:
        victim.write_bytes(b"this is not gzip")
    code = train.main(["--data-dir", str(tmp_path), "--no-download", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "t10k-images-idx3-ubyte.gz" in err
    assert "Traceback" not in err


def test_parse_idx_rejects_wrong_magic() -> None:
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8, "x")
    assert parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x02\x05\x06", "x").tolist() == [5, 6]
