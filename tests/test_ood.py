"""The out-of-distribution suite (anomaly/suite.py) and `vae-eval --ood` over it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from anomaly import base as score_base
from anomaly import evaluate as ood
from anomaly import fit as fit_score
from anomaly import score as anomaly
from anomaly import suite as ood_sets
from anomaly.suite import build_sets, cached_sets, mnist_style
from app.main import create_app
from app.settings import Settings
from tests.conftest import DATA_DIR, TEST_DATA
from training import evaluate

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()


def test_mnist_style_fits_20x20_and_centres_by_mass() -> None:
    ink = np.zeros((300, 120), np.uint8)
    ink[20:280, 30:50] = 255  # a tall bar, left of centre, on a big page
    ink[20:40, 30:110] = 255  # and a flag at its top: the mass sits high and left of the box's centre
    out = mnist_style(ink)
    ys, xs = np.nonzero(out > 0)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 <= 20  # long side 20, aspect kept
    mass = out.astype(float)
    cy = (mass.sum(1) * np.arange(28)).sum() / mass.sum()
    cx = (mass.sum(0) * np.arange(28)).sum() / mass.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert mnist_style(np.zeros((50, 50), np.uint8)).max() == 0


def test_no_digit_or_look_alike_is_drawn_as_a_non_digit() -> None:
    look_alikes = set("0123456789IlOoSsZzBbGgqi|/()[]{}!$§θϑЗбОоדרוזסვბგ")
    for chars in (ood_sets.UPPER, ood_sets.LOWER, ood_sets.GREEK_CYRILLIC, ood_sets.SYMBOLS,
                  *ood_sets.SCRIPT_FONTS.values()):
        assert not look_alikes & set(chars), chars


@pytest.fixture(scope="module")
def small_suite(mnist) -> dict[str, ood_sets.OodSet]:
    return build_sets(mnist.test_images[:200].numpy(), None, n=24, seed=3)


def test_suite_sets_are_28x28_with_ink_and_deterministic(small_suite, mnist) -> None:
    expected = {"noise", "mnist-rot90", "mnist-mirror", "letters-upper", "letters-lower", "greek-cyrillic",
                "symbols", "scribbles", "doodles", "digit-pairs", "font-digits"}
    assert expected <= set(small_suite) <= expected | {"other-scripts", "fashion"}
    near = [s for s in small_suite.values() if s.kind == "near"]
    assert len(near) >= 4 + 2  # at least four pen-stroke sets of our design, plus pairs and more
    for name, s in small_suite.items():
        assert s.images.shape == (24, 28, 28) and s.images.dtype == np.uint8, name
        assert (s.images.reshape(24, -1).max(1) > 100).all(), name  # every image has ink
    again = build_sets(mnist.test_images[:200].numpy(), None, n=24, seed=3)
    assert all(np.array_equal(again[k].images, s.images) for k, s in small_suite.items())
    mirrored = small_suite["mnist-mirror"].images
    assert any(np.array_equal(mirrored[0], m[:, ::-1]) for m in mnist.test_images[:200].numpy())


def test_the_drawn_sets_say_what_each_image_is(small_suite) -> None:
    """Each glyph is one of its set's characters, each doodle the shape its index names; sets that are
    not drawn from a list (noise, MNIST-derived, scribbles) have no labels."""
    alphabets = {"letters-upper": ood_sets.UPPER, "letters-lower": ood_sets.LOWER,
                 "greek-cyrillic": ood_sets.GREEK_CYRILLIC, "symbols": ood_sets.SYMBOLS,
                 "other-scripts": "".join(ood_sets.SCRIPT_FONTS.values()), "font-digits": ood_sets.DIGITS}
    for name, s in small_suite.items():
        if name in alphabets:
            assert s.labels is not None and s.labels.shape == (24,) and set(s.labels) <= set(alphabets[name]), name
        elif name == "doodles":
            assert s.labels.tolist() == [ood_sets.DOODLES[i % len(ood_sets.DOODLES)] for i in range(24)]
        else:
            assert s.labels is None, name
    assert len(set(small_suite["letters-upper"].labels)) > 5  # drawn at random, not one letter


def test_labels_stay_with_their_images_through_the_shuffle(mnist, monkeypatch: pytest.MonkeyPatch) -> None:
    """Glyphs drawn with their serial number in the first pixels: after build_sets shuffles the scripts
    together, each image's number still names the character its label says."""
    drawn: list[str] = []

    def numbered(chars: str, fonts: list, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([chars[int(i)] for i in rng.integers(len(chars), size=n)])
        images = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            images[i, 0, :2] = divmod(len(drawn), 256)
            drawn.append(str(labels[i]))
        return images, labels

    monkeypatch.setattr(ood_sets, "render_glyphs", numbered)
    sets = build_sets(mnist.test_images[:200].numpy(), None, n=24, seed=3)
    for name in ("letters-upper", "symbols", "other-scripts", "font-digits"):
        if name in sets:
            serial = sets[name].images[:, 0, 0].astype(int) * 256 + sets[name].images[:, 0, 1]
            assert sets[name].labels.tolist() == [drawn[i] for i in serial], name


def test_cache_round_trips_and_is_rebuilt_for_a_new_version(tmp_path: Path, small_suite,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "sets.npz"
    built = cached_sets(cache, lambda: small_suite)
    loaded = cached_sets(cache, lambda: pytest.fail("rebuilt a current cache"))
    assert {k: (v.kind, v.about) for k, v in loaded.items()} == {k: (v.kind, v.about) for k, v in built.items()}
    assert all(np.array_equal(loaded[k].images, v.images) for k, v in built.items())
    assert all(np.array_equal(loaded[k].labels, v.labels) if v.labels is not None else loaded[k].labels is None
               for k, v in built.items())
    monkeypatch.setattr(ood_sets, "CACHE_VERSION", ood_sets.CACHE_VERSION + 1)
    assert cached_sets(cache, lambda: {"x": small_suite["noise"]}).keys() == {"x"}


@pytest.mark.slow
def test_vae_eval_ood_reports_every_method_and_draws_failures(trained: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data-dir", str(DATA_DIR), "--ood", "--ood-n", "40", "--ood-k", "4", "--ood-cache",
            str(tmp_path / "sets.npz"), "--pictures", str(tmp_path / "pics"), "--fashion-dir", str(tmp_path)]
    assert evaluate.main([str(trained / "vae.pt"), *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in rows}
    assert methods == {"bound", "fisher", "latent (alone)", "broken (alone)", "energy (alone)",
                       "mahalanobis (alone)", "ratio (alone)", "bound - complexity (Serra)"}
    held = [r for r in rows if r["set"] == "MNIST held-out"]
    assert {r["n"] for r in held} == {5000}
    for r in rows:
        if r["set"] != "MNIST held-out":
            assert 0 <= r["auroc"] <= 1 and 0 <= r["fpr_at_95_tpr"] <= 1 and r["n"] == 40
    noise = next(r for r in rows if (r["method"], r["set"]) == ("bound", "noise"))
    assert noise["auroc"] > 0.99 and noise["flagged_at_p99"] == 1.0
    assert {p.name for p in (tmp_path / "pics").glob("*.png")} == {
        "vae-bound.png", "vae-fisher.png", "vae-latent.png", "vae-broken.png", "vae-energy.png",
        "vae-mahalanobis.png", "vae-ratio.png", "vae-bound---complexity.png"}
    assert evaluate.main([str(trained / "vae.pt"), *args, "--markdown", "--json", str(tmp_path / "rows.json")]) == 0
    table = capsys.readouterr().out
    assert "| vae | fisher |" in table and "mnist-rot90 (seen)" in table
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_statistic_names_come_from_meta_and_default_to_the_first_fitted_artifacts() -> None:
    named = {"anomaly_scores": {"methods": {"bound": {"column": 0},
                                            "fisher": {"column": 1, "statistics": ["bound", "a", "b"]}}}}
    assert ood.statistics(named) == ["bound", "a", "b"]
    first = {"anomaly_scores": {"methods": {"bound": {"column": 0}, "fisher": {"column": 1}}}}
    assert ood.statistics(first) == ["bound", "latent", "head"]  # artifacts fitted before meta listed them


@pytest.mark.slow
def test_a_score_base_can_distil_the_head_from_its_view_average(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two heads (seeds 0 and 1) are trained, then a third with their logits, each averaged over 3 views,
    averaged again as teacher."""
    out = tmp_path / "distilled.pth"
    train_head, teachers = anomaly.train_head, []

    def recording(*args: Any, **kwargs: Any) -> anomaly.DigitHead:
        teacher = kwargs.get("teacher")
        teachers.append((args[3], None if teacher is None else teacher(torch.zeros(2, 1, 28, 28)).shape))
        return train_head(*args, **kwargs)

    monkeypatch.setattr(score_base, "train_head", recording)
    assert score_base.main(["--data-dir", str(DATA_DIR), "--epochs", "1", "--train-limit", "1200", "--out", str(out),
                            "--no-progress", "--distil-views", "3", "--distil-teachers", "2",
                            "--ratio-epochs", "0"]) == 0
    base = score_base.ScoreBase.load(out)
    assert base.fitted_on == {
        "head_images": int((anomaly.reference_split(60_000)[1] < 1200).sum()), "head_epochs": 1, "device": "cpu",
        "torch": torch.__version__, "distilled_from_views": 3, "distilled_from_heads": 2, "ratio": None}
    assert teachers == [(0, None), (1, None), (0, (2, 11))]
    assert base.ratio is None and base.head.statistics(torch.rand(3, 1, 28, 28))[0].isfinite().all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_building_a_score_base_refuses_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert score_base.main(["--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_score_adds_the_score_to_an_old_artifact(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep-tiny.pt"
    assert fit_score.main([str(trained / "deep-tiny.pt"), "--data-dir", str(DATA_DIR), "--train-limit", "1200",
                           "--k", "8", "--out", str(out), "--score-base", str(trained / "score-base.pth")]) == 0
    module, meta = fit_score.export.load(out)
    assert meta["anomaly_scores"]["default"] == "fisher"
    fitted = meta["anomaly_scores"]["methods"]["fisher"]["fitted_on"]
    assert fitted == {**score_base.ScoreBase.load(trained / "score-base.pth").fitted_on, "seed": 0,
                      "reference_images": int((anomaly.reference_split(60_000)[0] < 1200).sum())}
    x = torch.rand(3, 1, 28, 28)
    eps = torch.randn(8, 3, 8)
    scores = module.anomaly_scores_with_noise(x, eps)
    assert torch.allclose(scores[:, 0], -module.log_likelihood_with_noise(x, eps))
    with TestClient(create_app(Settings(models_dir=tmp_path, default_model="deep-tiny"))) as client:
        body = client.post("/anomaly-score", content=DIGIT, headers={"content-type": "image/png"}).json()
        models = client.get("/models").json()["models"]
    assert body["method"] == "fisher" and body["k"] == 8 and body["calibration_k"] == 8
    assert models[0]["anomaly_score"]["default"] == "fisher"


def test_artifacts_are_labelled_by_file_so_a_refit_does_not_overwrite_its_original() -> None:
    assert evaluate.labels([Path("models/vae.pt"), Path("/tmp/vae-refit.pt")]) == ["vae", "vae-refit"]
    assert evaluate.labels([Path("models/vae.pt"), Path("/tmp/new/vae.pt")]) == ["models-vae", "new-vae"]
    assert evaluate.labels([Path("a/vae.pt"), Path("b/a/vae.pt")]) == ["a-vae-1", "a-vae-2"]


def test_an_ensemble_teacher_is_the_mean_of_its_teachers_logits() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    teacher = anomaly.ensemble([lambda t: t, lambda t: 3 * t, lambda t: -t])
    assert torch.equal(teacher(x), x)  # (1 + 3 - 1) / 3


@pytest.mark.parametrize("option", [["--distil-views", "-1"], ["--distil-teachers", "0"]])
def test_building_a_score_base_refuses_a_count_below_its_least(option: list[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        score_base.main(option)
    assert e.value.code == 2 and option[0] in capsys.readouterr().err


class Counting:
    """An artifact whose `anomaly_scores_with_noise` calls are counted; everything else passes through."""

    def __init__(self, module: Any) -> None:
        self.module, self.full_passes = module, 0

    def anomaly_scores_with_noise(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        self.full_passes += 1
        return self.module.anomaly_scores_with_noise(x, eps)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


@pytest.mark.parametrize(("tails_agree", "poses"), [(True, False), (False, False), (True, True)])
def test_suite_scores_are_the_artifacts_own_from_one_pass_once_checked(trained: Path, mnist,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       tails_agree: bool, poses: bool) -> None:
    """The suite scores each batch from the statistics' pass alone once the first batch showed that this
    gives the artifact's own answer; where it does not, or where the score searches poses (its answer for
    an image above the gate is not in that pass), every batch takes the artifact's own method."""
    module, meta = fit_score.export.load(trained / "vae.pt")
    assert module.poses.shape == (4, 2, 3)  # every fitted score searches poses
    if not poses:
        module.poses = torch.zeros(0, 2, 3)
    if not tails_agree:
        monkeypatch.setattr(ood, "fisher_table", lambda model, stats: torch.zeros(stats.shape[0], 2))
    x = mnist.test_images[:600].float().div(255).unsqueeze(1)  # three batches of 250
    counted = Counting(module)
    scores = ood.all_scores(counted, meta, x, k=4)
    noise = torch.randn(4, 1, module.latent_dim, generator=torch.Generator().manual_seed(0))
    table = anomaly.with_shared_noise(module.anomaly_scores_with_noise, x, noise, batch_size=250).double()
    assert torch.equal(scores["bound"], table[:, 0]) and torch.equal(scores["fisher"], table[:, 1])
    assert counted.full_passes == (1 if tails_agree and not poses else 3)


def test_variations_are_held_out_digits_moved_widened_and_turned(mnist) -> None:
    digits = mnist.test_images[:40].numpy()
    sets = ood_sets.variation_sets(digits, np.random.default_rng(0))
    assert list(sets) == ["shifted", "bold", "bold-page", "turned+15", "turned-15", "turned+30", "turned-30"]
    assert {s.kind for s in sets.values()} == {"variation"}
    moved = sets["shifted"].images
    for before, after in zip(digits, moved, strict=True):  # moved, never by nothing, no ink lost or wrapped
        (y0, x0), (y1, x1) = (np.argwhere(before).min(0)), (np.argwhere(after).min(0))
        assert (y1, x1) != (y0, x0) and abs(y1 - y0) <= 4 and abs(x1 - x0) <= 4
        assert np.array_equal(np.roll(before, (y1 - y0, x1 - x0), axis=(0, 1)), after)
    padded = np.pad(digits, ((0, 0), (1, 1), (1, 1)))
    assert np.array_equal(sets["bold"].images, np.max([padded[:, i : i + 28, j : j + 28] for i in range(3)
                                                       for j in range(3)], axis=0))
    turned = Image.fromarray(digits[0]).rotate(30, resample=Image.Resampling.BILINEAR)
    assert np.array_equal(sets["turned+30"].images[0], np.asarray(turned))
    assert sets["bold-page"].images.shape == (40, 28, 28)
    assert build_sets(mnist.test_images[:200].numpy(), None, n=24, seed=3).keys().isdisjoint(sets)  # none without

