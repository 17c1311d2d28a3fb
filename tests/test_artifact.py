"""docs/artifact.md, app/contract.py and a freshly exported artifact say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app import contract
from app.artifacts import ModelLoadError, load_model
from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO, TEST_DATA
from training import export

DOC = (REPO / "docs" / "artifact.md").read_text()
DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()


def doc_table(heading: str) -> dict[str, list[str]]:
    """First column (in backticks) -> the other cells, from the table under `heading`."""
    section = DOC.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([^`]+)`", cells[0]) if line.startswith("|") else None
        if m:
            rows[m.group(1)] = cells[1:]
    return rows


def test_doc_lists_exactly_the_contract() -> None:
    methods = doc_table("## Methods")
    assert {k: v[0].strip("`") for k, v in methods.items()} == contract.METHODS
    optional = doc_table("## Optional methods")
    assert {k: v[0].strip("`") for k, v in optional.items()} == contract.OPTIONAL_METHODS
    meta = doc_table("## `meta.json`")
    assert sorted(meta) == sorted(contract.META_KEYS)
    assert {k for k, v in meta.items() if v[0] == "yes"} == set(contract.REQUIRED_META)
    levels = ", ".join(f"{p:g}" for p in contract.CALIBRATION_PERCENTILES[:-2])
    assert levels in DOC and f"({contract.DEFAULT_ANOMALY_K} when absent)" in DOC


def test_fresh_artifact_keeps_the_contract(trained: Path) -> None:
    module, meta = export.load(trained / "deep-tiny.pt")
    assert set(meta) == set(contract.META_KEYS) - {"anomaly_scores"}  # trained with --no-score
    for method in contract.METHODS:
        assert hasattr(module, method), method
    assert meta["input_shape"] == contract.INPUT_SHAPE
    points, k = contract.calibration_points(meta)
    assert [p for p, _ in points] == list(contract.CALIBRATION_PERCENTILES)
    assert k == contract.DEFAULT_ANOMALY_K
    assert list(meta["anomaly_calibration"]["quantiles"])[-3:] == ["p99", "p99.5", "p99.9"]
    served = load_model(trained / "deep-tiny.pt", torch.device("cpu"))
    assert served.scores["bound"].calibration == points and served.scores["bound"].default_k == k
    assert served.default_score == "bound" and list(served.scores) == ["bound"]


@pytest.mark.parametrize(("quantiles", "message"), [
    ({"p50": 10.0, "p99": 5.0}, "must not decrease"),
    ({"median": 10.0}, "named like 'p99'"),
    ({"p100": 10.0}, "out of range"),
    ({"p50": float("nan")}, "out of range"),
])
def test_bad_calibration_fails_start_up(tmp_path: Path, trained: Path, quantiles: dict, message: str) -> None:
    module, meta = export.load(trained / "vae.pt")
    export.save(module, tmp_path / "vae.pt", {**meta, "anomaly_calibration": {"k": 8, "quantiles": quantiles}})
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path / "vae.pt", torch.device("cpu"))


def test_artifact_without_calibration_is_served_without_percentiles(tmp_path: Path, trained: Path) -> None:
    module, meta = export.load(trained / "deep-tiny.pt")
    export.save(module, tmp_path / "vae.pt", {k: v for k, v in meta.items() if k != "anomaly_calibration"})
    served = load_model(tmp_path / "vae.pt", torch.device("cpu"))
    bound = served.scores["bound"]
    assert bound.percentile(100.0) is None and bound.threshold(99.0) is None
    assert bound.default_k == contract.DEFAULT_ANOMALY_K
    with TestClient(create_app(Settings(models_dir=tmp_path, default_model="deep-tiny"))) as client:
        body = client.post("/anomaly-score", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert body["k"] == contract.DEFAULT_ANOMALY_K and body["calibration_k"] is None
    assert body["threshold"] is None and body["percentile"] is None and body["is_anomaly"] is None
    assert body["score"] > 0


# --- what start-up refuses, and how it says so -------------------------------------------------

def _save(folder: Path, name: str, module: torch.jit.ScriptModule, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    export.save(module, folder / f"{name}.pt", meta)
    return folder / f"{name}.pt"


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: {k: v for k, v in m.items() if k != "name"}, "meta.json must give a string 'name' and an integer "
                                                            "'latent_dim'"),
    (lambda m: {**m, "latent_dim": "8"}, "must give a string 'name' and an integer 'latent_dim'"),
    (lambda m: {**m, "input_shape": [3, 28, 28]}, "input_shape [3, 28, 28] is not [1, 28, 28]"),
    (lambda m: {**m, "latent_dim": 3}, "does meta.json's latent_dim=3 match the model?"),
    (lambda m: {**m, "anomaly_scores": []}, "anomaly_scores must be {'default': NAME, 'methods': {NAME: {...}}}"),
    (lambda m: {**m, "anomaly_scores": {"default": "x"}}, "anomaly_scores must be"),
    (lambda m: {**m, "anomaly_scores": {"methods": {"x": {"column": 0}}}}, "anomaly_scores.methods.x needs an "
                                                                            "integer column >= 1"),
    (lambda m: {**m, "anomaly_scores": {"default": "y", "methods": {"x": {"column": 1}}}},
     "anomaly_scores.default 'y' is not among ['bound', 'x']"),
    (lambda m: {**m, "anomaly_scores": {"default": "x", "methods": {"x": {"column": 1}}}},
     "names anomaly scores ['bound', 'x'], but the artifact lacks anomaly_scores_with_noise"),
])
def test_start_up_refuses_an_artifact_that_lies_and_names_the_file(tmp_path: Path, trained: Path, change,
                                                                   message: str) -> None:
    module, meta = export.load(trained / "deep-tiny.pt")  # no anomaly_scores_with_noise
    path = _save(tmp_path, "deep-tiny", module, change(meta))
    with pytest.raises(ModelLoadError) as e:
        load_model(path, torch.device("cpu"))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_fitted_score_column_past_the_artifacts_output_is_refused(tmp_path: Path, trained: Path) -> None:
    module, meta = export.load(trained / "vae.pt")
    scores = meta["anomaly_scores"]
    scores["methods"]["fisher"]["column"] = 5
    path = _save(tmp_path, "vae", module, meta)
    with pytest.raises(ModelLoadError, match=r"anomaly_scores_with_noise returned \(2, 2\); meta.json names column 5"):
        load_model(path, torch.device("cpu"))


def test_bad_files_and_folders_are_refused_by_name(tmp_path: Path, trained: Path) -> None:
    from app.artifacts import load_models

    cpu = torch.device("cpu")
    with pytest.raises(ModelLoadError, match=f"^{tmp_path / 'none'}: models folder does not exist$"):
        load_models(tmp_path / "none", cpu, "vae")
    empty = r": no \*\.pt or <name>/<version>/model\.pt model files in the models folder$"
    with pytest.raises(ModelLoadError, match=empty):
        load_models(tmp_path, cpu, "vae")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError) as junk:
        load_models(tmp_path, cpu, "vae")
    assert str(junk.value) == (f"{tmp_path / 'junk.pt'}: not a loadable TorchScript archive (PytorchStreamReader "
                               "failed reading zip archive: not a ZIP archive. This is an internal miniz error. If "
                               "you are seeing this error, there is a high likelihood that your checkpoint file is "
                               "corrupted. This can happen if the checkpoint was not saved properly, was transferred "
                               "incorrectly, or the file was modified after saving.)")
    (tmp_path / "junk.pt").unlink()
    module, meta = export.load(trained / "deep-tiny.pt")
    torch.jit.save(module, str(tmp_path / "nometa.pt"))
    with pytest.raises(ModelLoadError, match=r"nometa\.pt: meta\.json missing or not JSON \(.+\)$"):
        load_models(tmp_path, cpu, "vae")
    (tmp_path / "nometa.pt").unlink()
    _save(tmp_path, "a", module, meta)
    _save(tmp_path, "b", module, meta)
    with pytest.raises(ModelLoadError, match=r"b\.pt: model name 'deep-tiny' version 1 already used by .*a\.pt$"):
        load_models(tmp_path, cpu, "deep-tiny")
    (tmp_path / "b.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"default model 'vae' not among \['deep-tiny'\] \(set VAE_DEFAULT"):
        load_models(tmp_path, cpu, "vae")
    loaded = load_models(tmp_path, cpu, "deep-tiny")["deep-tiny"]["1"]
    assert 0 < loaded.load_seconds < 60
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.scores["bound"].about == "-log p(x), IWAE bound, nats"
    assert [(name, m.name) for name, m in loaded.scores.items()] == [("bound", "bound")]


class EncoderOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_an_artifact_missing_methods_is_refused_with_their_names(tmp_path: Path) -> None:
    path = _save(tmp_path, "half", torch.jit.script(EncoderOnly()), {"name": "half", "latent_dim": 2})
    with pytest.raises(ModelLoadError) as refused:
        load_model(path, torch.device("cpu"))
    assert str(refused.value) == f"{path}: artifact lacks method(s) decode, log_likelihood, log_likelihood_with_noise"


def test_an_artifact_from_before_input_shape_was_recorded_is_served(tmp_path: Path, trained: Path) -> None:
    module, meta = export.load(trained / "deep-tiny.pt")
    path = _save(tmp_path, "deep-tiny", module, {k: v for k, v in meta.items() if k != "input_shape"})
    assert load_model(path, torch.device("cpu")).latent_dim == 8
