"""Loading the TorchScript artifacts and checking them against the contract (app/contract.py).

The artifact is the single source of truth: shapes, latent size and calibration come
from its `meta.json` and are verified by calling its methods once, so a file that
lies fails start-up instead of failing a user's request later.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.contract import (
    BOUND,
    DEFAULT_ANOMALY_K,
    DIGITS_METHOD,
    INPUT_SHAPE,
    LATENT_MAP_FILE,
    META_FILE,
    METHODS,
    NEIGHBOURS_FILE,
    REQUIRED_META,
    SCORES_METHOD,
    latent_map,
    score_methods,
)
from app.neighbours import NeighbourIndex

log = logging.getLogger("app.artifacts")
warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)



class ModelLoadError(Exception):
    """A models folder or artifact the service must not start with; the message names the file."""


@dataclass(frozen=True)
class ScoreMethod:
    """One anomaly score an artifact serves, with the calibration that turns it into a percentile."""

    name: str
    column: int | None  # its column of anomaly_scores_with_noise; None: -log_likelihood_with_noise (the bound)
    # (percentile, score) points of the in-distribution calibration; both ascending.
    calibration: list[tuple[float, float]] = field(default_factory=list)
    k: int | None = None  # the k it was calibrated at
    about: str = ""

    @property
    def default_k(self) -> int:
        """Percentiles only mean something at the k the calibration was made with."""
        return self.k or DEFAULT_ANOMALY_K

    def percentile(self, score: float) -> float | None:
        """Where a score falls among the calibration scores, by linear interpolation between quantiles;
        below the lowest quantile half its percentile, above the highest 100."""
        if not self.calibration:
            return None
        scores = [s for _, s in self.calibration]
        i = bisect.bisect_left(scores, score)  # scores[i - 1] < score <= scores[i]
        if i == 0:
            return self.calibration[0][0] if score == scores[0] else max(0.0, self.calibration[0][0] * 0.5)
        if i == len(scores):
            return 100.0
        (p0, s0), (p1, s1) = self.calibration[i - 1], self.calibration[i]
        return p0 + (p1 - p0) * (score - s0) / (s1 - s0)

    def threshold(self, percentile: float) -> float | None:
        """The score at a percentile of the calibration set (inverse of `percentile`)."""
        if not self.calibration:
            return None
        ps = [p for p, _ in self.calibration]
        if percentile <= ps[0]:
            return self.calibration[0][1]
        if percentile >= ps[-1]:
            return self.calibration[-1][1]
        i = bisect.bisect_left(ps, percentile)
        (p0, s0), (p1, s1) = self.calibration[i - 1], self.calibration[i]
        return s0 + (s1 - s0) * (percentile - p0) / (p1 - p0)


@dataclass(frozen=True)
class LatentMap:
    """A 2-D model's `latent_map.json`, ready to send: compact JSON, gzipped once at start-up (150 kB -> 60 kB
    for the 10,000 test means; compressing per request would cost milliseconds each), and its ETag."""

    body: bytes
    gzipped: bytes
    etag: str

    @classmethod
    def of(cls, block: dict[str, Any]) -> LatentMap:
        body = json.dumps(block, separators=(",", ":")).encode()
        return cls(body, gzip.compress(body, mtime=0), '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


@dataclass
class ServedModel:
    name: str
    path: Path
    module: torch.jit.ScriptModule
    meta: dict[str, Any]
    device: torch.device
    latent_dim: int
    scores: dict[str, ScoreMethod] = field(default_factory=lambda: {BOUND: ScoreMethod(BOUND, None)})
    default_score: str = BOUND
    latent_map: LatentMap | None = None
    digits: tuple[Tensor, Tensor] | None = None  # each digit's latent Gaussian: means [10, D], scale_tril [10, D, D]
    index: NeighbourIndex | None = None  # the training digits' posterior means, for POST /similar
    load_seconds: float = 0.0  # reading, checking and warming it up: vae_model_load_seconds
    version: str = "1"  # of its model in the repository (app/repository.py)

    @property
    def fitted_columns(self) -> list[int]:
        """Columns of anomaly_scores_with_noise that the served methods read; empty: the bound alone."""
        return [s.column for s in self.scores.values() if s.column is not None]

    def describe(self) -> dict[str, Any]:
        return {**self.meta, "name": self.name, "version": self.version, "device": str(self.device),
                "file": self.path.name,
                "anomaly_score": {"default": self.default_score,
                                  "methods": {n: {"about": m.about, "calibration_k": m.k,
                                                  "calibrated": bool(m.calibration)}
                                              for n, m in self.scores.items()}},
                "latent_map": f"/models/{self.name}/latent-map" if self.latent_map else None,
                "capabilities": {"sample_digit": self.digits is not None,
                                 "similar": None if self.index is None else {"digits": len(self.index)}}}


def load_model(path: Path, device: torch.device) -> ServedModel:
    start = time.perf_counter()
    extra = {META_FILE: "", LATENT_MAP_FILE: "", NEIGHBOURS_FILE: ""}  # a file the archive lacks reads back as b""
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError/ValueError/OSError variously for bad archives
        raise ModelLoadError(f"{path}: not a loadable TorchScript archive ({str(e).splitlines()[0]})") from e
    try:
        meta = json.loads(extra[META_FILE])
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: {META_FILE} missing or not JSON ({e})") from e
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in REQUIRED_META.items()):
        raise ModelLoadError(f"{path}: {META_FILE} must give a string 'name' and an integer 'latent_dim'")
    if meta.get("input_shape", INPUT_SHAPE) != INPUT_SHAPE:
        raise ModelLoadError(f"{path}: input_shape {meta.get('input_shape')} is not {INPUT_SHAPE}")
    missing = [m for m in METHODS if not hasattr(module, m)]
    if missing:
        raise ModelLoadError(f"{path}: artifact lacks method(s) {', '.join(missing)}")
    try:
        methods, default_score = score_methods(meta)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: anomaly scores in {META_FILE}: {e}") from e
    if any(m["column"] is not None for m in methods.values()) and not hasattr(module, SCORES_METHOD):
        raise ModelLoadError(f"{path}: {META_FILE} names anomaly scores {sorted(methods)}, but the artifact lacks "
                             f"{SCORES_METHOD}")
    lmap = None
    if extra[LATENT_MAP_FILE]:
        try:
            lmap = LatentMap.of(latent_map(json.loads(extra[LATENT_MAP_FILE]), meta["latent_dim"]))
        except ValueError as e:  # JSONDecodeError included
            raise ModelLoadError(f"{path}: {LATENT_MAP_FILE}: {e}") from e
    index = None
    if extra[NEIGHBOURS_FILE]:
        try:
            index = NeighbourIndex.read(extra[NEIGHBOURS_FILE], meta["latent_dim"], device)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {NEIGHBOURS_FILE}: {e}") from e
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    scores = {n: ScoreMethod(n, m["column"], m["points"], m["k"], m["about"]) for n, m in methods.items()}
    model = ServedModel(meta["name"], path, module, meta, device, meta["latent_dim"], scores, default_score, lmap,
                        index=index)
    check_contract(model)
    if hasattr(module, DIGITS_METHOD):
        model.digits = digit_gaussians(model)
    model.load_seconds = time.perf_counter() - start
    return model


@torch.no_grad()
def check_contract(model: ServedModel) -> None:
    """Call every method once on known inputs; shapes, ranges and finiteness must hold."""
    d, m, path = model.latent_dim, model.module, model.path
    x = torch.full((2, 1, 28, 28), 0.5, device=model.device)
    try:
        mu, logvar = m.encode(x)
        probs = m.decode(torch.zeros(2, d, device=model.device))
        ll = m.log_likelihood_with_noise(x, torch.zeros(2, 2, d, device=model.device))
    except Exception as e:
        raise ModelLoadError(f"{path}: calling the artifact failed ({str(e).splitlines()[0]}); "
                             f"does meta.json's latent_dim={d} match the model?") from e
    if tuple(mu.shape) != (2, d) or tuple(logvar.shape) != (2, d):
        raise ModelLoadError(f"{path}: encode returned {tuple(mu.shape)}, but meta.json says latent_dim={d}")
    if tuple(probs.shape) != (2, 1, 28, 28) or not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ModelLoadError(f"{path}: decode must return [B,1,28,28] in [0,1], got {tuple(probs.shape)}")
    if tuple(ll.shape) != (2,) or not all(math.isfinite(v) for v in ll.tolist()):
        raise ModelLoadError(f"{path}: log_likelihood_with_noise must return [B] finite values")
    columns = model.fitted_columns
    if columns:
        out = m.anomaly_scores_with_noise(x, torch.zeros(2, 2, d, device=model.device))
        if out.dim() != 2 or out.shape[0] != 2 or out.shape[1] <= max(columns):
            raise ModelLoadError(f"{path}: {SCORES_METHOD} returned {tuple(out.shape)}; meta.json names column "
                                 f"{max(columns)}")


@torch.no_grad()
def digit_gaussians(model: ServedModel) -> tuple[Tensor, Tensor]:
    """The artifact's per-digit latent Gaussians, checked: ten finite means of latent_dim values, and
    lower-triangular factors with a positive diagonal (a covariance's Cholesky factor)."""
    d, path = model.latent_dim, model.path
    try:
        means, trils = model.module.digit_gaussians()
    except Exception as e:
        raise ModelLoadError(f"{path}: {DIGITS_METHOD} failed ({str(e).splitlines()[0]})") from e
    if tuple(means.shape) != (10, d) or tuple(trils.shape) != (10, d, d):
        raise ModelLoadError(f"{path}: {DIGITS_METHOD} returned {tuple(means.shape)} and {tuple(trils.shape)}; "
                             f"expected (10, {d}) and (10, {d}, {d})")
    diagonal = trils.diagonal(dim1=1, dim2=2)
    if not (bool(means.isfinite().all()) and bool(trils.isfinite().all()) and bool((diagonal > 0).all())
            and bool((trils.triu(1) == 0).all())):
        raise ModelLoadError(f"{path}: {DIGITS_METHOD} must return finite means and lower-triangular factors with "
                             "a positive diagonal")
    return means.float(), trils.float()


@torch.no_grad()
def warm_up(model: ServedModel, passes: int = 3) -> None:
    """Run each method at a few batch sizes so the first user request pays no JIT profiling cost."""
    start = time.perf_counter()
    for _ in range(passes):
        for b in (1, 8):
            x = torch.rand(b, 1, 28, 28, device=model.device)
            model.module.encode(x)
            model.module.forward(x)
            model.module.decode(torch.randn(b, model.latent_dim, device=model.device))
            eps = torch.randn(4, b, model.latent_dim, device=model.device)
            model.module.log_likelihood_with_noise(x, eps)
            if model.fitted_columns:
                model.module.anomaly_scores_with_noise(x, eps)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    model.load_seconds += time.perf_counter() - start


VERSION_FILE = "model.pt"  # models/<name>/<version>/model.pt, Triton's layout for PyTorch models
FLAT_VERSION = "1"  # a flat models/<file>.pt is version 1 of the model its meta.json names


@dataclass(frozen=True, order=True)
class ArtifactFile:
    """A file the repository serves: `name` is its folder's for the versioned layout, None for a flat
    file (its meta.json names it); `version` is a whole number."""

    path: Path
    name: str | None
    version: str

    def signature(self) -> tuple[int, int, int] | None:
        """What changes when the file is replaced or rewritten (None: gone)."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino


def artifact_files(folder: Path) -> list[ArtifactFile]:
    """The artifacts in a models folder: flat `*.pt` files and `<name>/<version>/model.pt`."""
    found = [ArtifactFile(p, None, FLAT_VERSION) for p in folder.glob("*.pt") if p.is_file()]
    for path in folder.glob(f"*/*/{VERSION_FILE}"):
        version, name = path.parent.name, path.parent.parent.name
        if version.isascii() and version.isdigit() and not name.startswith("."):
            found.append(ArtifactFile(path, name, str(int(version))))
    return sorted(found)


def load_artifact(file: ArtifactFile, device: torch.device) -> ServedModel:
    """A file loaded, checked and warmed up; a versioned file serves under its folder's name."""
    model = load_model(file.path, device)
    if file.name is not None and file.name != model.name:
        log.info("%s: served as %r, its folder's name (meta.json says %r)", file.path, file.name, model.name)
        model.name = file.name
    model.version = file.version
    warm_up(model)
    return model


def load_models(folder: Path, device: torch.device, default: str) -> dict[str, dict[str, ServedModel]]:
    """Every artifact of a models folder by name and version, as start-up needs them: any file that
    fails its checks fails the whole start, so that a service never comes up half-ready."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: models folder does not exist")
    files = artifact_files(folder)
    if not files:
        raise ModelLoadError(f"{folder}: no *.pt or <name>/<version>/{VERSION_FILE} model files in the models folder")
    models: dict[str, dict[str, ServedModel]] = {}
    for file in files:
        model = load_artifact(file, device)
        same = models.setdefault(model.name, {})
        if file.version in same:
            raise ModelLoadError(f"{file.path}: model name {model.name!r} version {file.version} already used by "
                                 f"{same[file.version].path}")
        same[file.version] = model
    if default not in models:
        raise ModelLoadError(f"{folder}: default model {default!r} not among {sorted(models)} (set VAE_DEFAULT_MODEL)")
    return models
