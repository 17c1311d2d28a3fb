"""The anomaly score's percentile, threshold and seeds, pinned to values computed here."""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app import contract
from app.artifacts import ScoreMethod
from app.imaging import Preprocess, file_to_tensor
from app.main import create_app
from app.settings import Settings
from tests.conftest import TEST_DATA
from training import export

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
PNG = {"content-type": "image/png"}


def served(points: list[tuple[float, float]]) -> ScoreMethod:
    return ScoreMethod("bound", None, points, 64)


def test_percentile_and_threshold_interpolate_the_calibration_table() -> None:
    m = served([(10.0, 50.0), (50.0, 100.0), (90.0, 150.0), (99.0, 200.0)])
    assert m.percentile(100.0) == 50.0
    assert m.percentile(75.0) == 30.0  # halfway between p10=50 and p50=100
    assert m.percentile(140.0) == pytest.approx(82.0)  # 50 + 40 * 40/50
    assert m.percentile(175.0) == pytest.approx(94.5)  # 90 + 9 * 25/50
    assert m.percentile(200.0) == 99.0 and m.percentile(200.5) == 100.0  # past the top: above every calibration image
    assert m.percentile(50.0) == 10.0 and m.percentile(10.0) == 5.0  # below the bottom: half the lowest percentile
    assert m.threshold(50.0) == 100.0 and m.threshold(70.0) == 125.0
    assert m.threshold(95.0) == pytest.approx(177.7778, abs=1e-4)
    assert m.threshold(5.0) == 50.0 and m.threshold(99.9) == 200.0  # clamped to the table
    for p in (12.0, 37.5, 63.0, 91.0, 98.0):
        assert m.percentile(m.threshold(p)) == pytest.approx(p)  # inverse of each other


def test_percentile_at_the_ends_of_a_table_like_the_shipped_ones() -> None:
    m = served([(1.0, 40.0), (50.0, 90.0), (99.9, 180.0)])
    assert m.percentile(39.0) == 0.5  # under p1: half of it
    assert m.percentile(40.0) == 1.0 and m.percentile(180.0) == 99.9
    assert m.percentile(180.001) == 100.0


def test_calibration_block_is_the_documented_format() -> None:
    block = contract.calibration_block(64, "MNIST test set", {99.5: 20.123456, 1.0: 10.0, 99.0: 19.5}, 15.55555,
                                       2.44444, 100)
    assert block == {"k": 64, "n": 100, "data": "MNIST test set",
                     "quantiles": {"p1": 10.0, "p99": 19.5, "p99.5": 20.1235}, "mean": 15.5556, "std": 2.4444}
    assert list(block["quantiles"]) == ["p1", "p99", "p99.5"]  # ascending, as read back
    assert contract.calibration_points({"anomaly_calibration": block}) == ([(1.0, 10.0), (99.0, 19.5),
                                                                           (99.5, 20.1235)], 64)


@pytest.mark.parametrize(("quantiles", "message"), [
    ({"p0": 1.0}, "calibration quantile p0=1.0 is out of range"),
    ({"p100": 1.0}, "calibration quantile p100=1.0 is out of range"),
    ({"p50": float("inf")}, "calibration quantile p50=inf is out of range"),
    ({"q50": 1.0}, "calibration quantile 'q50' is not named like 'p99'"),
    ({"p50": 2.0, "p90": 1.0}, "calibration scores must not decrease with the percentile"),
])
def test_a_bad_calibration_table_is_refused_with_the_reason(quantiles: dict, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        contract.calibration_points({"anomaly_calibration": {"k": 8, "quantiles": quantiles}})
    assert str(refused.value) == message


def test_a_flat_stretch_of_the_calibration_table_is_allowed() -> None:
    flat = {"anomaly_calibration": {"quantiles": {"p10": 5.0, "p50": 5.0, "p90": 7.0}}}
    assert contract.calibration_points(flat) == ([(10.0, 5.0), (50.0, 5.0), (90.0, 7.0)], None)


def test_score_methods_reads_each_methods_column_calibration_and_description() -> None:
    bound_cal = {"k": 64, "quantiles": {"p50": 100.0, "p99": 150.0}}
    meta = {"anomaly_calibration": bound_cal,
            "anomaly_scores": {"default": "fisher", "methods": {
                "fisher": {"column": 1, "about": "three tails", "calibration": {"k": 32, "quantiles": {"p99": 9.0}}},
                "plain": {"column": 2}}}}
    methods, default = contract.score_methods(meta)
    assert default == "fisher"
    assert methods == {
        "bound": {"column": None, "points": [(50.0, 100.0), (99.0, 150.0)], "k": 64,
                  "about": "-log p(x), IWAE bound, nats"},
        "fisher": {"column": 1, "points": [(99.0, 9.0)], "k": 32, "about": "three tails"},
        "plain": {"column": 2, "points": [], "k": None, "about": ""}}
    no_default = {"anomaly_scores": {"methods": meta["anomaly_scores"]["methods"]}}
    assert contract.score_methods(no_default)[1] == "bound"
    assert contract.score_methods({}) == ({"bound": {"column": None, "points": [], "k": None,
                                                     "about": "-log p(x), IWAE bound, nats"}}, "bound")


@pytest.mark.parametrize(("block", "message"), [
    ([], "anomaly_scores must be {'default': NAME, 'methods': {NAME: {...}}}"),
    ({"default": "x"}, "anomaly_scores must be {'default': NAME, 'methods': {NAME: {...}}}"),
    ({"methods": {"x": 5}}, "anomaly_scores.methods.x needs an integer column >= 1"),
    ({"methods": {"x": {"column": "1"}}}, "anomaly_scores.methods.x needs an integer column >= 1"),
    ({"methods": {"x": {"column": 0}}}, "anomaly_scores.methods.x needs an integer column >= 1"),
    ({"default": "y", "methods": {"x": {"column": 1}}}, "anomaly_scores.default 'y' is not among ['bound', 'x']"),
])
def test_a_bad_score_block_is_refused_with_the_reason(block: object, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        contract.score_methods({"anomaly_scores": block})
    assert str(refused.value) == message


@pytest.fixture(scope="module")
def calibrated(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, float]]:
    """The tiny model with a calibration table laid around DIGIT's own score s: p10 = s-100,
    p50 = s-10, p90 = s+30, p99 = s+100. So DIGIT's percentile is 50 + 40 * 10/40 = 60."""
    module, meta = export.load(models_dir / "vae.pt")
    eps = torch.randn(64, 1, 2, generator=torch.Generator().manual_seed(0))
    x = file_to_tensor(DIGIT, 784, Preprocess())[None]
    s = float(-module.log_likelihood_with_noise(x, eps)[0].detach())
    folder = tmp_path_factory.mktemp("calibrated")
    quantiles = {"p10": s - 100, "p50": s - 10, "p90": s + 30, "p99": s + 100}
    meta = {k: v for k, v in meta.items() if k != "anomaly_scores"}  # the bound alone, as before fitted scores
    export.save(module, folder / "vae.pt", {**meta, "anomaly_calibration": {"k": 64, "quantiles": quantiles}})
    with TestClient(create_app(Settings(models_dir=folder, default_model="vae"))) as client:
        yield client, s


def test_served_percentile_is_computed_against_the_table(calibrated: tuple[TestClient, float]) -> None:
    client, s = calibrated
    body = client.post("/anomaly-score", content=DIGIT, headers=PNG).json()
    assert body["k"] == 64 and body["calibration_k"] == 64
    assert body["score"] == pytest.approx(s, rel=1e-6)
    assert body["percentile"] == pytest.approx(60.0, abs=1e-3)
    assert body["threshold"] == pytest.approx(s + 100, rel=1e-6) and body["is_anomaly"] is False  # default p99


@pytest.mark.parametrize(("pct", "offset", "flagged"), [(55.0, -5.0, True), (60.0, 0.0, False), (70.0, 10.0, False),
                                                         (30.0, -55.0, True), (95.0, 30 + 70 * 5 / 9, False)])
def test_threshold_moves_with_threshold_percentile(calibrated: tuple[TestClient, float], pct: float, offset: float,
                                                   flagged: bool) -> None:
    client, s = calibrated
    body = client.post(f"/anomaly-score?threshold_percentile={pct}", content=DIGIT, headers=PNG).json()
    assert body["threshold_percentile"] == pct
    assert body["threshold"] == pytest.approx(s + offset, abs=1e-3)
    assert body["is_anomaly"] is flagged or math.isclose(body["score"], body["threshold"], abs_tol=1e-3)


def test_anomaly_seeds_same_gives_same_different_gives_different(calibrated: tuple[TestClient, float]) -> None:
    client, _ = calibrated
    scores = {}
    for seed in (1, 2, 1, 3, 2):
        body = client.post(f"/anomaly-score?seed={seed}", content=DIGIT, headers=PNG).json()
        scores.setdefault(seed, set()).add(body["score"])
    assert all(len(v) == 1 for v in scores.values())  # a seed always gives its score
    assert len({next(iter(v)) for v in scores.values()}) == 3  # each seed its own (the noise is drawn per seed)


def test_a_drawn_seed_is_one_the_api_accepts_back() -> None:
    """X-Seed must be a valid ?seed=: below MAX_SEED (2**63, torch's and JSON clients' signed 64-bit range),
    and drawn from all of it (64 draws each below 2**62 would happen once in 2**64)."""
    from app.inference import new_seed
    from app.queries import MAX_SEED

    seeds = [new_seed() for _ in range(64)]
    assert all(0 <= s < MAX_SEED == 2**63 for s in seeds) and max(seeds) >= 2**62 and len(set(seeds)) == 64


def test_sample_seeds_and_seedless_calls(calibrated: tuple[TestClient, float]) -> None:
    client, _ = calibrated
    a, b = (client.get("/sample?n=4&seed=9") for _ in range(2))
    assert a.content == b.content != client.get("/sample?n=4&seed=10").content
    seedless = [client.get("/sample?n=4") for _ in range(3)]
    seeds = {r.headers["x-seed"] for r in seedless}
    assert len(seeds) == 3 and len({r.content for r in seedless}) == 3  # a new seed, and so new digits, each time
    again = client.get(f"/sample?n=4&seed={seedless[0].headers['x-seed']}")
    assert again.content == seedless[0].content  # and the seed it reports reproduces them


class _FixedLikelihood:
    """A stand-in artifact whose log-likelihood is whatever the test says, for the Engine's own logic."""

    def __init__(self, ll: float) -> None:
        self.ll = ll

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(z.shape[0], 1, 28, 28)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x, *self.encode(x)

    def log_likelihood_with_noise(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.ll)


@pytest.mark.parametrize(("ll", "score", "flagged"), [
    (-100.0, 100.0, False),  # exactly at the threshold: not above it, not an anomaly
    (-100.5, 100.5, True),
    (-math.inf, sys.float_info.max, True),  # JSON has no infinity: the largest float instead
])
def test_engine_flags_scores_strictly_above_the_threshold(ll: float, score: float, flagged: bool) -> None:
    from app.artifacts import ServedModel
    from app.inference import Engine

    bound = ScoreMethod("bound", None, [(50.0, 50.0), (99.0, 100.0)], 4)
    model = ServedModel("m", Path("m.pt"), _FixedLikelihood(ll), {}, torch.device("cpu"), 2,  # type: ignore[arg-type]
                        {"bound": bound})
    engine = Engine(model, compute=None)
    result = asyncio.run(engine.anomaly_scores(torch.zeros(1, 1, 28, 28), None, 0, None))
    engine.close()
    assert result.threshold == 100.0 and result.k == 4 and result.method == "bound"
    assert result.results[0].score == score and result.results[0].is_anomaly is flagged


def test_limits_and_batching_come_from_the_settings() -> None:
    from app.inference import Batching, Limits

    s = Settings(max_batch=5, max_samples=6, max_k=7, default_k=8, default_threshold_percentile=95.0,
                 batch_max_size=9, batch_max_wait_us=2000, request_timeout_s=3.0, inline_max_us=500)
    assert Limits.from_settings(s) == Limits(5, 6, 7, 8, 95.0)
    assert Batching.from_settings(s) == Batching(9, 0.002, 3.0, 0.0005)


def test_default_k_and_threshold_settings_reach_the_answer(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", default_k=8, default_threshold_percentile=95.0)
    with TestClient(create_app(settings)) as client:
        body = client.post("/anomaly-score", content=DIGIT, headers=PNG).json()
    assert body["k"] == 8 and body["threshold_percentile"] == 95.0
