"""Does the service answer the same on the GPU as on the CPU? Run it on a machine with CUDA.

The same real app (bundled models, `create_app`) is started once per device and sent the same
requests: every image in tests/data as one batch and each alone, for encode, reconstruct, decode,
sample and both anomaly scores. Printed per endpoint: the largest difference between the devices,
and on each device between the batched and the alone answer. Floats differ in their last bits
between devices (other kernels, other summation orders); what must not differ is a decision:
the exit status is 1 if an image is flagged on one device and not on the other, or a value moves
by more than the tolerance below.

    python scripts/device_parity.py [--models-dir models] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted(p for p in (REPO / "tests" / "data").iterdir() if p.suffix in {".png", ".jpg"})
# Relative to the value's scale: float32 on different kernels agrees to ~1e-6 of it; a percentile
# near a steep part of the calibration curve can move more, so it gets its own, looser bound.
TOLERANCE = {"value": 1e-4, "percentile": 0.05}


@contextmanager
def serving(models_dir: Path, device: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, device=device, max_batch=64))) as c:
        yield c


def post_images(c: TestClient, url: str, images: list[Path]) -> dict:
    r = c.post(url, files=[("file", (p.name, p.read_bytes())) for p in images])
    r.raise_for_status()
    return r.json()


def results(body: dict) -> list[dict]:
    """One image's answer is the object itself, several images' a list under "results"."""
    return body.get("results", [body])


def answers(c: TestClient, model: str, latent_dim: int, batched: bool) -> dict[str, np.ndarray]:
    """Every numeric answer, keyed by endpoint; `batched`: all images in one request, else one per request."""
    groups = [IMAGES] if batched else [[p] for p in IMAGES]
    out: dict[str, list] = {}
    for group in groups:
        enc = results(post_images(c, f"/encode?model={model}", group))
        out.setdefault("encode mu", []).extend(r["mu"] for r in enc)
        out.setdefault("encode logvar", []).extend(r["logvar"] for r in enc)
        out.setdefault("reconstruct", []).extend(
            post_images(c, f"/reconstruct?model={model}&format=json", group)["images"])
        for method in ("", "&method=bound"):
            res = results(post_images(c, f"/anomaly-score?model={model}&seed=3{method}", group))
            name = "anomaly bound" if method else "anomaly default"
            out.setdefault(f"{name} score", []).extend(r["score"] for r in res)
            out.setdefault(f"{name} percentile", []).extend(r["percentile"] for r in res)
            out.setdefault(f"{name} flagged", []).extend(float(r["is_anomaly"]) for r in res)
    z = np.random.default_rng(0).standard_normal((8, latent_dim)).round(3).tolist()
    r = c.post(f"/decode?model={model}&format=json", json={"z": z})
    r.raise_for_status()
    out["decode"] = r.json()["images"]
    r = c.get(f"/sample?model={model}&n=8&seed=7&format=json")
    r.raise_for_status()
    out["sample"] = r.json()["images"]
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference over the scale of the values (so scores and pixels compare alike)."""
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=REPO / "models")
    p.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    args = p.parse_args(argv)
    import torch

    if "cuda" in args.devices and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 2
    found: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = {}
    for device in args.devices:
        with serving(args.models_dir, device) as c:
            models = c.get("/models").json()["models"]
            found[device] = {m["name"]: {mode: answers(c, m["name"], m["latent_dim"], mode == "batched")
                                           for mode in ("batched", "alone")} for m in models}
            print(f"{device}: {', '.join(m['name'] + ' on ' + m['device'] for m in models)}")
    a, b = args.devices
    print(f"torch {torch.__version__}; {len(IMAGES)} images from tests/data; largest difference over the "
          f"values' scale (flagged: images decided differently)")
    print(f"{'model':<8} {'answer':<28} {a + ' vs ' + b:>12} {'batched vs alone (' + a + ')':>26} "
          f"{'batched vs alone (' + b + ')':>26}")
    failed = False
    for model, by_mode in found[a].items():
        for key, ref in by_mode["batched"].items():
            other = found[b][model]["batched"][key]
            across = gap(ref, other)
            within = [gap(found[d][model]["batched"][key], found[d][model]["alone"][key]) for d in (a, b)]
            if key.endswith("flagged"):
                across = int(np.abs(ref - other).sum())
                within = [int(np.abs(found[d][model]["batched"][key] - found[d][model]["alone"][key]).sum())
                          for d in (a, b)]
                bad = across > 0 or any(within)
            else:
                bound = TOLERANCE["percentile" if key.endswith("percentile") else "value"]
                bad = across > bound or any(w > bound for w in within)
            failed |= bad
            print(f"{model:<8} {key:<28} {across:>12.2e} {within[0]:>26.2e} {within[1]:>26.2e}"
                  f"{'  <- over tolerance' if bad else ''}")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
