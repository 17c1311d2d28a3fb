"""The `ratio` statistic (anomaly/ratio.py) and the images its two models are trained on
(anomaly/glyph_pool.py): what it computes, which way it points, and that nothing it sees is a set, a
script or a font face of the evaluation suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly import glyph_pool
from anomaly import suite as ood_sets
from anomaly.base import main as build_base
from anomaly.fit import main as fit_score
from anomaly.glyph_pool import (
    OTHER_SCRIPTS,
    SUITE_SCRIPTS,
    MissingFonts,
    check_fonts,
    other_script_glyphs,
    printed_digit_fonts,
    printed_digits,
)
from anomaly.ratio import GlyphRatio, train_density
from anomaly.score import STATISTICS, NoRatio, Tails, artifact_head, reference_split
from tests.conftest import DATA_DIR
from training import export
from training.model import VAE, DeepVAE
from training.train import main as train

# the suite's scripts and the scripts a reader would call their close relatives (a shared ancestor a few
# centuries back, letters that still look alike): none may be in the glyph pool
RELATIVES = {
    "Hebrew": {"Samaritan", "ImperialAramaic", "Nabataean", "Palmyrene", "Hatran", "Phoenician", "Mandaic", "Syriac"},
    "Devanagari": {"Bengali", "Gurmukhi", "Gujarati", "Kaithi", "Modi", "Nandinagari", "Takri", "Sharada", "Mahajani",
                   "Tirhuta", "Dogra", "Khudawadi", "Siddham", "Brahmi"},
    "Armenian": {"CaucasianAlbanian"},
    "Thai": {"Lao", "LoopedThai", "TaiViet", "TaiLe", "NewTaiLue"},
    "Georgian": {"CaucasianAlbanian"},
}
LATIN_GREEK_CYRILLIC = {"", "Display", "Mono", "Coptic", "Gothic", "OldItalic", "Glagolitic", "OldPermic", "Carian",
                        "Lycian", "Lydian"}


def test_the_glyph_pool_shares_no_script_with_the_suite_nor_with_its_relatives() -> None:
    assert set(SUITE_SCRIPTS) == {"Hebrew", "Devanagari", "Armenian", "Thai", "Georgian"}
    forbidden = set(SUITE_SCRIPTS) | set().union(*RELATIVES.values()) | LATIN_GREEK_CYRILLIC
    assert not forbidden & set(OTHER_SCRIPTS)
    assert len(set(OTHER_SCRIPTS)) == len(OTHER_SCRIPTS) == 48


def test_printed_digits_use_no_face_of_the_suite() -> None:
    faces = printed_digit_fonts()
    assert len(faces) >= 10, "apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35"
    assert not {f.name for f in faces} & {Path(f).name for f in ood_sets.FONT_FILES}
    assert not [f for f in faces if "Symbol" in f.name or "MathTeX" in f.name or "D050000L" in f.name]


def test_the_pools_are_drawn_like_the_suite_and_are_the_same_for_a_seed() -> None:
    glyphs, again = other_script_glyphs(96, seed=1), other_script_glyphs(96, seed=1)
    assert glyphs.shape == (96, 28, 28) and glyphs.dtype == np.uint8 and np.array_equal(glyphs, again)
    assert not np.array_equal(glyphs, other_script_glyphs(96, seed=2))
    digits = printed_digits(40, seed=1)
    assert digits.shape == (40, 28, 28) and np.array_equal(digits, printed_digits(40, seed=1))
    for images in (glyphs, digits):
        ink = images > 0

        def extent(lines: np.ndarray) -> np.ndarray:  # [N, 28] bool -> the span of the ink per image
            return np.array([np.flatnonzero(v).max() - np.flatnonzero(v).min() + 1 for v in lines])

        # fitted like MNIST: the longer side of the ink is 20 px, whatever the glyph's size in its font
        assert np.array_equal(np.maximum(extent(ink.any(2)), extent(ink.any(1))), np.full(len(images), 20))
        assert (images.reshape(len(images), -1).max(1) > 200).all()  # every image has solid ink


def test_each_script_gets_its_share_of_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[str, int]] = []

    def record(chars: str, fonts: list, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        drawn.append((fonts[0].name, n))
        return np.zeros((n, 28, 28), np.uint8), np.array([chars[0]] * n)

    monkeypatch.setattr(glyph_pool, "render_glyphs", record)
    assert other_script_glyphs(100).shape == (100, 28, 28)
    assert len(drawn) == 48 and {n for _, n in drawn} <= {2, 3} and sum(n for _, n in drawn) == 100
    assert [name.removeprefix("NotoSans").split("-")[0] for name, _ in drawn] == list(OTHER_SCRIPTS)


def test_missing_fonts_are_named_before_a_score_base_is_built_and_training_needs_none(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fonts draw the ratio's glyphs: only `vae-build-score-base` needs them, and says so before it trains
    anything. vae-train fits its score around a base and never draws a glyph."""
    monkeypatch.setattr(glyph_pool, "FONT_DIRS", [tmp_path])
    monkeypatch.setattr(ood_sets, "FONT_DIRS", [tmp_path])
    with pytest.raises(MissingFonts, match="fonts-noto-core"):
        check_fonts()
    assert build_base(["--data-dir", str(tmp_path), "--out", str(tmp_path / "b.pth")]) == 2
    assert "fonts-noto-core" in capsys.readouterr().err
    assert train(["--data-dir", str(tmp_path), "--out", str(tmp_path / "m.pt"),
                  "--score-base", str(tmp_path / "none.pth")]) == 2  # before training: no base
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vae-build-score-base" in err and "none.pth" in err


def test_vae_train_without_any_font_serves_the_fitted_score(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           trained: Path) -> None:
    """One epoch on 2,000 digits with no font installed: the default score is fitted around the base."""
    monkeypatch.setattr(glyph_pool, "FONT_DIRS", [tmp_path])
    monkeypatch.setattr(ood_sets, "FONT_DIRS", [tmp_path])
    out = tmp_path / "fontless.pt"
    assert train(["--data-dir", str(DATA_DIR), "--no-download", "--no-progress", "--epochs", "1", "--train-limit",
                  "2000", "--eval-k", "4", "--eval-limit", "200", "--latent-dim", "2", "--hidden", "32",
                  "--score-base", str(trained / "score-base.pth"), "--out", str(out)]) == 0
    _, meta = export.load(out)
    assert meta["anomaly_scores"]["default"] == "fisher"
    assert meta["anomaly_scores"]["methods"]["fisher"]["fitted_on"]["reference_images"] == \
        int((reference_split(60_000)[0] < 2000).sum())


def test_the_ratio_is_the_glyph_models_bound_less_the_digit_models_with_its_own_noise() -> None:
    torch.manual_seed(0)
    digits, glyphs = DeepVAE(4, 16).eval(), DeepVAE(4, 16).eval()
    ratio = GlyphRatio(digits, glyphs, k=5, seed=3)
    x = torch.rand(6, 1, 28, 28)
    eps = torch.randn(5, 1, 4, generator=torch.Generator().manual_seed(3)).expand(5, 6, 4)
    with torch.no_grad():
        want = glyphs.log_likelihood_with_noise(x, eps) - digits.log_likelihood_with_noise(x, eps)
        assert torch.allclose(ratio(x), want)
        alone = torch.cat([ratio(x[i : i + 1]) for i in range(6)])
        assert torch.allclose(alone, ratio(x), atol=1e-5)  # the same batched or alone
    assert torch.equal(torch.jit.script(ratio)(x), ratio(x))
    with pytest.raises(ValueError, match="latent size"):
        GlyphRatio(DeepVAE(4, 16), VAE(latent_dim=3, hidden=16))


def test_trained_models_make_the_ratio_large_for_glyphs_and_small_for_digits() -> None:
    """Two tiny models, one of "digits" (vertical bars) and one of "glyphs" (horizontal bars): the ratio
    points the way the score reads it, larger = less like a digit."""
    g = torch.Generator().manual_seed(0)
    bars = torch.zeros(256, 1, 28, 28)
    for i, c in enumerate(torch.randint(6, 22, (256,), generator=g)):
        bars[i, 0, 4:24, c - 1 : c + 2] = 1.0
    digits = train_density(bars, 20, seed=0, name="digits", progress=False)
    glyphs = train_density(bars.transpose(-1, -2), 20, seed=1, name="glyphs", progress=False)
    ratio = GlyphRatio(digits, glyphs, k=4)
    with torch.no_grad():
        assert ratio(bars[:16]).max() < 0 < ratio(bars[:16].transpose(-1, -2)).min()


def test_a_score_without_its_ratio_has_a_zero_column_that_fishers_sum_ignores() -> None:
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(NoRatio()(x), torch.zeros(5))
    reference = torch.cat([torch.randn(200, 1), torch.zeros(200, 1)], 1)
    tails = Tails(reference)
    s = torch.cat([torch.randn(7, 1) * 3, torch.zeros(7, 1)], 1)
    assert torch.isfinite(tails.beta).all()
    assert torch.equal(tails(s)[:, 1], torch.zeros(7))
    assert torch.allclose(tails(s)[:, 0], Tails(reference[:, :1])(s[:, :1])[:, 0])


def test_a_base_taken_from_an_artifact_refits_its_score_with_the_same_head_and_ratio(trained: Path,
                                                                                     tmp_path: Path) -> None:
    """`vae-build-score-base --from-artifact` then `vae-fit-score`: the head's and the ratio's weights and
    their record survive; the mixture, the tails and the calibration are fitted again."""
    old, meta = export.load(trained / "vae.pt")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(artifact_head(old).statistics(x), old.head.statistics(x),
                                                       strict=True))
    assert build_base(["--from-artifact", str(trained / "vae.pt"), "--out", str(tmp_path / "base.pth")]) == 0
    out = tmp_path / "refit.pt"
    assert fit_score([str(trained / "vae.pt"), "--data-dir", str(DATA_DIR), "--score-base", str(tmp_path / "base.pth"),
                      "--train-limit", "2000", "--k", "8", "--out", str(out)]) == 0
    new, new_meta = export.load(out)
    before, after = (m["anomaly_scores"]["methods"]["fisher"] for m in (meta, new_meta))
    assert after["fitted_on"] == before["fitted_on"] and after["calibration"]["k"] == 8
    eps = torch.randn(8, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old.anomaly_statistics(x, eps), new.anomaly_statistics(x, eps))  # same parts


def test_a_trained_artifact_carries_its_ratio_and_says_what_it_saw(trained: Path) -> None:
    """vae-train around the tiny base (tests/conftest.py: --ratio-epochs 1 --ratio-glyphs 480 --ratio-printed 100,
    the first 2,000 digits less the reference images)."""
    module, meta = export.load(trained / "vae.pt")
    fitted = meta["anomaly_scores"]["methods"]["fisher"]["fitted_on"]
    assert fitted["ratio"] == {"digit_images": int((reference_split(60_000)[1] < 2000).sum()), "printed_digits": 100,
                               "glyphs": 480, "scripts": 48, "epochs": 1, "k": 16, "device": "cpu"}
    x = torch.rand(3, 1, 28, 28)
    eps = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(0))
    noise = module.ratio.noise.expand(16, 3, 32)
    with torch.no_grad():
        want = module.ratio.glyphs.log_likelihood_with_noise(x, noise) - \
            module.ratio.digits.log_likelihood_with_noise(x, noise)
        assert torch.allclose(module.anomaly_statistics(x, eps)[:, STATISTICS.index("ratio")], want)
    assert module.ratio.noise.shape == (16, 1, 32)  # its own draw: the served VAE's latent is 2-D
