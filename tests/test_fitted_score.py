"""The fitted anomaly score (anomaly/score.py): its parts pinned to values computed here, and the
service serving it from the artifact (method, calibration, batching, the picture)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from anomaly.score import (
    POSES,
    STATISTICS,
    DigitHead,
    LatentMixture,
    Tails,
    broken_digits,
    jitter,
    mixed,
    random_affines,
    recipe,
    reference_split,
    train_head,
    turns,
    under_views,
    view_average,
    views,
)
from anomaly.suite import turned
from app import explain
from app.imaging import Preprocess, file_to_tensor
from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO, TEST_DATA
from training import export

DIGITS = sorted(TEST_DATA.glob("mnist_test_*_digit_*.png"))
DIGIT = DIGITS[0].read_bytes()
PNG = {"content-type": "image/png"}


def prep(data: bytes) -> torch.Tensor:
    return file_to_tensor(data, 10**7, Preprocess())


# --- the parts --------------------------------------------------------------------------

def test_tails_are_empirical_below_the_99th_percentile_and_exponential_above() -> None:
    ref = torch.arange(1, 101, dtype=torch.float32)[:, None]  # 1..100, one statistic
    tails = Tails(ref)
    q = float(torch.quantile(ref.double()[:, 0], 0.99))  # 99.01
    assert float(tails.q) == pytest.approx(q, abs=1e-4) and float(tails.beta) == pytest.approx(100 - q, abs=1e-4)
    s = torch.tensor([[0.5], [1.0], [50.0], [50.5], [99.0]])
    # P(reference >= s), with one pseudo-count: (N - #below + 1) / (N + 1)
    expected = [101 / 101, 101 / 101, 52 / 101, 51 / 101, 3 / 101]
    assert tails(s)[:, 0].exp().tolist() == pytest.approx(expected, rel=1e-6)
    far = torch.tensor([[q + 1.0], [q + 10.0]])
    got = tails(far)[:, 0]
    beta = 100 - q
    assert got.tolist() == pytest.approx([math.log(0.01) - 1 / beta, math.log(0.01) - 10 / beta], rel=1e-5)
    assert bool(got[1] < got[0])  # far outliers keep being ordered instead of tying at 1/(N+1)


def test_latent_mixture_is_the_equal_weight_gaussian_mixture_of_the_ten_digits() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(50)
    mu = torch.randn(500, 3, generator=g) + y[:, None].float()
    mixture = LatentMixture(mu, y, ridge=0.0)
    probe = torch.randn(4, 3, generator=g) * 3
    comps = []
    for c in range(10):
        m = mu[y == c].double()
        cov = torch.cov(m.T)
        comps.append(torch.distributions.MultivariateNormal(m.mean(0), cov).log_prob(probe.double()))
    expected = -(torch.logsumexp(torch.stack(comps, 1), 1) - math.log(10))
    assert mixture(probe).tolist() == pytest.approx(expected.tolist(), rel=1e-4)


def test_broken_digits_break_each_digit_and_never_mirror_a_symmetric_one() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 1, 28, 28, generator=g)
    y = torch.arange(10).repeat(40)
    out = broken_digits(x, y, torch.Generator().manual_seed(2))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert bool(changed.all())  # every negative differs from its digit
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert mirrored.any() and not bool(mirrored[torch.isin(y, torch.tensor([0, 1, 8]))].any())
    again = broken_digits(x, y, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)  # deterministic for a generator


class Fixed(torch.nn.Module):
    """Features that do not depend on the image: the head's arithmetic alone under test."""

    def __init__(self, f: torch.Tensor) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f


def test_head_statistics_are_broken_log_odds_digit_energy_and_nearest_mahalanobis() -> None:
    head = DigitHead(features=2)
    head.features = Fixed(torch.tensor([[0.0, 0.0], [2.0, 1.0]]))
    with torch.no_grad():
        head.classes.weight.zero_()
        head.classes.weight[10, 0] = 1.0  # the broken logit is 3 + the first feature
        head.classes.bias.copy_(torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3]))
        head.means.copy_(torch.stack([torch.arange(10.0), torch.zeros(10)], 1))  # digit c at (c, 0)
        head.precision.copy_(torch.diag(torch.tensor([1.0, 4.0])))
    broken, energy, maha = head.statistics(torch.zeros(2, 1, 28, 28))
    lse = math.log(sum(math.exp(i) for i in range(10)))  # logsumexp of the ten digit logits
    assert broken.tolist() == pytest.approx([3 - lse, 5 - lse], rel=1e-6)
    assert energy.tolist() == pytest.approx([-lse, -lse], rel=1e-6)
    assert maha.tolist() == pytest.approx([0.0, 4.0], abs=1e-6)  # (2, 1) is nearest digit 2's (2, 0)
    assert DigitHead()(torch.zeros(3, 784)).shape == (3, 11)


def test_head_feature_statistics_are_the_class_means_and_their_shared_covariance() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(10).repeat(30)
    f = torch.randn(300, 2, generator=g) * torch.tensor([1.0, 3.0]) + y[:, None].float()
    head = DigitHead(features=2)
    head.features = torch.nn.Identity()
    head.fit_features(f, y, ridge=0.0)
    means = torch.stack([f[y == c].double().mean(0) for c in range(10)])
    centred = f.double() - means[y]
    assert head.means.flatten().tolist() == pytest.approx(means.flatten().tolist(), rel=1e-5)
    expected = torch.linalg.inv(centred.T @ centred / 300)  # pooled over classes, divided by N
    assert head.precision.flatten().tolist() == pytest.approx(expected.flatten().tolist(), rel=1e-4)


def test_jitter_keeps_ink_in_the_box_and_is_deterministic() -> None:
    x = torch.zeros(50, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    out = jitter(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, jitter(x, torch.Generator().manual_seed(0)))
    ink = out.flatten(1).sum(1)  # zoom within +-10%: ink scales by its square at most
    assert float(ink.min()) > 32 * 0.75 and float(ink.max()) < 32 * 1.3
    still = jitter(x, torch.Generator().manual_seed(0), turn=0.0, zoom=0.0, shift=0.0)
    assert torch.allclose(still, x, atol=1e-5)



def test_random_affines_stay_in_their_ranges_and_are_the_identity_at_zero() -> None:
    a = random_affines(500, torch.Generator().manual_seed(0))
    scale = torch.linalg.det(a[:, :, :2]).sqrt()  # a turn times a zoom: the determinant is zoom squared
    turn = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    assert float(scale.min()) >= 0.9 - 1e-6 and float(scale.max()) <= 1.1 + 1e-6
    assert float(turn.abs().max()) <= 0.175 + 1e-6 and float(turn.abs().max()) > 0.15
    assert float(a[:, :, 2].abs().max()) <= 0.15 and float(a[:, :, 2].abs().max()) > 0.13
    still = random_affines(3, torch.Generator().manual_seed(0), turn=0.0, zoom=0.0, shift=0.0)
    assert torch.equal(still, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(3, 2, 3))


def test_reference_split_is_disjoint_covers_all_and_takes_a_sixth() -> None:
    ref, head = reference_split(600, seed=0)
    assert ref.numel() == 100 and head.numel() == 500
    assert sorted(torch.cat([ref, head]).tolist()) == list(range(600))
    assert torch.equal(ref, reference_split(600, seed=0)[0]) and not torch.equal(ref, reference_split(600, seed=1)[0])


def test_a_teacher_pulls_the_heads_logits_towards_its_own() -> None:
    """Distillation: with a teacher whose logits are all zero, the head's logits end up smaller than
    without one, the same seed and batches otherwise."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 1, 28, 28, generator=g), torch.arange(256) % 10

    def zeros(inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(inputs.shape[0], 11)

    plain = train_head(x, y, 2, seed=0, progress=False)
    taught = train_head(x, y, 2, seed=0, progress=False, teacher=zeros)
    with torch.no_grad():
        size = {name: float(h(x).pow(2).mean()) for name, h in (("plain", plain), ("taught", taught))}
    assert size["taught"] < 0.5 * size["plain"]
    again = train_head(x, y, 2, seed=0, progress=False, teacher=zeros)
    pairs = zip(taught.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)



def test_mixed_blends_each_image_with_another_of_the_batch() -> None:
    """Image i is filled with the value i: a blend of two of them is constant, between its two sources,
    and every image is a source once (a permutation)."""
    x = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 1, 28, 28)
    out = mixed(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, mixed(x, torch.Generator().manual_seed(0)))
    assert (out == out[:, :, :1, :1]).all()  # one share per image, not per pixel
    g = torch.Generator().manual_seed(0)
    share, partner = torch.rand(6, 1, 1, 1, generator=g), torch.randperm(6, generator=g)
    assert torch.allclose(out, share * x + (1 - share) * x[partner])
    assert sorted(partner.tolist()) == list(range(6)) and not torch.equal(out, x)


def test_with_mixup_the_student_matches_the_teacher_on_a_blended_copy_too() -> None:
    """The teacher sees the digits, their broken copies and as many blends; without mixup, only the first two."""
    x, y = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    seen: list[int] = []

    def zeros(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs.shape[0])
        return torch.zeros(inputs.shape[0], 11)

    train_head(x, y, 1, seed=0, batch_size=4, progress=False, teacher=zeros, mixup=True)
    assert seen == [16, 16]
    seen.clear()
    train_head(x, y, 1, seed=0, batch_size=4, progress=False, teacher=zeros)
    assert seen == [8, 8]


def test_the_heads_width_is_a_setting_and_the_default_is_the_shipped_one() -> None:
    module, _ = export.load(REPO / "models" / "vae.pt")
    shipped = {k[5:]: v.shape for k, v in module.state_dict().items() if k.startswith("head.")}
    assert {k: v.shape for k, v in DigitHead().state_dict().items()} == shipped
    wide = DigitHead(channels=64)
    assert [m.out_channels for m in wide.features if isinstance(m, torch.nn.Conv2d)] == [64, 128]
    assert wide(torch.zeros(2, 784)).shape == (2, 11)


def test_the_fitted_on_record_leaves_the_student_options_out_at_their_defaults() -> None:
    base = {"head_images": 10, "head_epochs": 2, "device": "cpu", "torch": torch.__version__}
    assert recipe(10, 2, "cpu") == base
    assert recipe(10, 2, "cpu", 17, 3) == {**base, "distilled_from_views": 17, "distilled_from_heads": 3}
    assert recipe(10, 2, "cpu", 17, 3, 12, True, 64) == {
        **base, "distilled_from_views": 17, "distilled_from_heads": 3, "student_epochs": 12, "student_mixup": True,
        "head_channels": 64}


def test_view_average_is_the_mean_of_the_heads_logits_over_the_views() -> None:
    torch.manual_seed(0)
    head = DigitHead().eval()
    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(under_views(x, views(0)), x, atol=1e-5)  # the first view is the image itself
    maps = views(3, seed=1)
    assert maps.shape == (4, 2, 3) and torch.equal(maps, views(3, seed=1)) and not torch.equal(maps, views(3, seed=2))
    with torch.no_grad():
        each = torch.stack([head(under_views(x, maps[i : i + 1])) for i in range(4)])
        assert torch.allclose(view_average(head, maps)(x), each.mean(0), atol=1e-5)
        assert torch.allclose(view_average(head, views(0))(x), head(x), atol=1e-5)

# --- served -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as c:
        yield c


@pytest.fixture(scope="module")
def scored(models_dir: Path) -> torch.jit.ScriptModule:
    return export.load(models_dir / "vae.pt")[0]


def test_default_method_is_the_fitted_one_and_equals_the_artifact(client: TestClient,
                                                                  scored: torch.jit.ScriptModule) -> None:
    body = client.post("/anomaly-score?seed=4", content=DIGIT, headers=PNG).json()
    assert body["method"] == "fisher" and body["k"] == 64
    eps = torch.randn(64, 1, 2, generator=torch.Generator().manual_seed(4))
    both = scored.anomaly_scores_with_noise(prep(DIGIT)[None], eps)[0]
    assert body["score"] == pytest.approx(float(both[1]), rel=1e-5)
    bound = client.post("/anomaly-score?seed=4&method=bound", content=DIGIT, headers=PNG).json()
    assert bound["method"] == "bound" and bound["score"] == pytest.approx(float(both[0]), rel=1e-5)
    assert bound["threshold"] != body["threshold"]  # each method has its own calibration


def test_statistics_are_the_named_ones_and_the_first_is_the_bound(scored: torch.jit.ScriptModule,
                                                                  models_dir: Path) -> None:
    meta = export.load(models_dir / "vae.pt")[1]
    assert meta["anomaly_scores"]["methods"]["fisher"]["statistics"] == list(STATISTICS)
    x = torch.stack([prep(p.read_bytes()) for p in DIGITS[:3]])
    eps = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(0))
    stats = scored.anomaly_statistics(x, eps)
    assert stats.shape == (3, len(STATISTICS))
    assert stats[:, 0].tolist() == pytest.approx((-scored.log_likelihood_with_noise(x, eps)).tolist(), rel=1e-6)


def test_turns_are_rotations_about_the_centre() -> None:
    maps = turns((90.0, -30.0))
    assert np.allclose(maps[0], [[0, -1, 0], [1, 0, 0]], atol=1e-7)
    assert np.allclose(maps[1], [[math.sqrt(3) / 2, 0.5, 0], [-0.5, math.sqrt(3) / 2, 0]], atol=1e-7)


def test_the_score_keeps_its_lowest_pose_never_below_the_gate(scored: torch.jit.ScriptModule,
                                                              models_dir: Path) -> None:
    """Images above the gate are scored turned by each pose (plus 1 per 15 degrees turned) and keep their
    lowest score, clamped at the gate; the rest keep their upright score. Computed here from the
    statistics, pose by pose."""
    meta = export.load(models_dir / "vae.pt")[1]
    poses = meta["anomaly_scores"]["methods"]["fisher"]["poses"]
    assert poses == {"degrees": list(POSES), "gate": pytest.approx(float(scored.gate), abs=1e-4),
                     "gate_percentile": 98.0, "cost_per_15_degrees": 0.5}
    digits = np.stack([np.asarray(Image.open(p)) for p in DIGITS])
    noise = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    images = np.concatenate([digits, turned(digits, 30), turned(digits, -40), noise])
    x = torch.from_numpy(images.astype(np.float32) / 255)[:, None]
    eps = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(1)).expand(16, len(x), 2)
    got = scored.anomaly_scores_with_noise(x, eps)[:, 1]

    def fisher(images: torch.Tensor) -> torch.Tensor:
        return -scored.tails(scored.anomaly_statistics(images, eps)).sum(dim=1)

    upright = fisher(x)
    lowest = torch.stack([fisher(under_views(x, m[None])) + 0.5 * abs(d) / 15 for m, d in zip(turns(POSES), POSES,
                                                                                       strict=True)]).amin(0)
    gate = scored.gate
    expected = torch.where(upright > gate, torch.maximum(torch.minimum(upright, lowest), gate), upright)
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    over = upright > gate
    assert over.any() and (~over).any() and (lowest[over] < upright[over]).any()  # both branches, and a turn helps
    alone = torch.cat([scored.anomaly_scores_with_noise(x[i : i + 1], eps[:, i : i + 1]) for i in range(len(x))])
    assert alone[:, 1].tolist() == pytest.approx(got.tolist(), rel=1e-5)  # the same alone as in a batch


def test_fitted_score_threshold_is_its_own_calibration(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    fisher = models["vae"]["anomaly_scores"]["methods"]["fisher"]["calibration"]
    body = client.post("/anomaly-score?threshold_percentile=95", content=DIGIT, headers=PNG).json()
    assert body["threshold"] == pytest.approx(fisher["quantiles"]["p95"], rel=1e-6)
    assert body["calibration_k"] == fisher["k"] == 64
    assert body["is_anomaly"] == (body["score"] > body["threshold"])
    assert models["vae"]["anomaly_score"]["default"] == "fisher"
    assert set(models["vae"]["anomaly_score"]["methods"]) == {"bound", "fisher"}
    assert models["deep-tiny"]["anomaly_score"] == {"default": "bound", "methods": {"bound": {
        "about": "-log p(x), IWAE bound, nats", "calibration_k": 64, "calibrated": True}}}


def test_fitted_score_is_the_same_batched_or_alone(client: TestClient) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in DIGITS]
    batch = client.post("/anomaly-score?seed=7", files=files).json()["results"]
    for i, f in enumerate(files):
        alone = client.post("/anomaly-score?seed=7", files=[f]).json()
        assert alone["score"] == pytest.approx(batch[i]["score"], rel=1e-5)


def test_unknown_method_names_the_served_ones(client: TestClient) -> None:
    r = client.post("/anomaly-score?method=dose", content=DIGIT, headers=PNG)
    assert r.status_code == 422
    assert r.json() == {"error": "unknown score method", "detail": "'dose'; model 'vae' serves ['bound', 'fisher']"}
    old = client.post("/anomaly-score?model=deep-tiny", content=DIGIT, headers=PNG).json()
    assert old["method"] == "bound"  # an artifact from before fitted scores: the bound, as before


def test_picture_shows_input_reconstruction_and_pixel_heat(client: TestClient, scored: torch.jit.ScriptModule) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in DIGITS[:2]]
    r = client.post("/anomaly-score?format=png", files=files)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    side, pad = 28 * explain.SCALE, explain.PAD
    assert img.shape == (18 + 2 * (side + pad) + pad, 3 * side + 4 * pad + explain.TEXT_W, 3)
    x = torch.stack([prep(p.read_bytes()) for p in DIGITS[:2]])
    recon = scored.forward(x)[0].detach()
    heat = explain.hot((explain.pixel_nll(x, recon) / explain.HEAT_MAX).numpy())
    for row in range(2):
        top = 18 + row * (side + pad)
        for cy, cx in ((14, 14), (5, 20), (20, 9)):
            py, px = top + cy * explain.SCALE + 1, cx * explain.SCALE + 1
            assert img[py, pad + px, 0] == round(float(x[row, 0, cy, cx]) * 255)
            assert abs(int(img[py, pad + side + pad + px, 0]) - round(float(recon[row, 0, cy, cx]) * 255)) <= 1
            assert np.abs(img[py, pad + 2 * (side + pad) + px].astype(int) - heat[row, 0, cy, cx]).max() <= 1


def test_hot_colour_map_is_matplotlibs() -> None:
    got = explain.hot(np.array([0.0, 1 / 3, 0.5, 2 / 3, 1.0, 2.0]))
    assert got.tolist() == [[0, 0, 0], [255, 0, 0], [255, 128, 0], [255, 255, 0], [255, 255, 255], [255, 255, 255]]
