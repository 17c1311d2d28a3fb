"""Many concurrent requests to the real app: each answer equals the one it gets alone.

Mixed endpoints, models, batch sizes, seeds and k, all in flight at once through httpx's
ASGI transport on one event loop, so dynamic batching merges them into shared forward
passes. Every answer must match its sequential answer within the README's batching
tolerance (1e-5), and the rows of a batch must never go to the wrong request.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import TEST_DATA

DIGITS = [p.read_bytes() for p in sorted(TEST_DATA.glob("mnist_test_*.png"))]
PHOTO = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()
Request = tuple[str, str, dict[str, Any]]


def requests() -> list[Request]:
    out: list[Request] = []
    for model in ("vae", "deep-tiny"):
        for i, d in enumerate(DIGITS):
            out.append(("POST", f"/encode?model={model}", {"content": d, "headers": {"content-type": "image/png"}}))
            batch = [("file", (f"{j}.png", DIGITS[j], "image/png")) for j in range(i + 1)]
            out.append(("POST", f"/encode?model={model}", {"files": batch}))
            for k, seed in ((8, i), (16, 0), (64, i + 1)):
                out.append(("POST", f"/anomaly-score?model={model}&k={k}&seed={seed}", {"files": batch}))
        out.append(("POST", f"/encode?model={model}", {"json": {"images": [base64.b64encode(PHOTO).decode()]}}))
        jpeg = {"content": PHOTO, "headers": {"content-type": "image/jpeg"}}
        out.append(("POST", f"/anomaly-score?model={model}", jpeg))
        out.append(("POST", f"/reconstruct?model={model}&format=json", {"files": batch}))
        for n, seed in ((1, 5), (5, 6), (3, 5)):
            out.append(("GET", f"/sample?model={model}&n={n}&seed={seed}&format=json", {}))
    out.append(("POST", "/decode?format=json", {"json": {"z": [[0.0, 0.0], [1.0, -2.0]]}}))
    out.append(("POST", "/decode?format=json", {"json": {"z": [[0.5, 0.5]]}}))
    return out


def close(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        rounding = 1e-5 if ".images" in path or ".originals" in path else 0.0  # pixels are rounded to 5 decimals
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5 + rounding + 1e-12), (path, a, b)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            close(a[key], b[key], f"{path}.{key}")
    else:
        assert a == b, (path, a, b)


def test_concurrent_answers_equal_sequential_ones(models_dir: Path) -> None:
    app = create_app(Settings(models_dir=models_dir, default_model="vae"))
    reqs = requests()
    work = [r for r in reqs for _ in range(3)]
    random.Random(0).shuffle(work)

    async def main() -> tuple[dict[int, Any], list[tuple[int, Any]], dict[str, Any]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:

                async def send(req: Request) -> Any:
                    method, url, kwargs = req
                    r = await client.request(method, url, **kwargs)
                    assert r.status_code == 200, (url, r.text)
                    return r.json()

                alone = {i: await send(r) for i, r in enumerate(reqs)}
                together = await asyncio.gather(*(send(r) for r in work))
                stats = (await client.get("/models")).json()
        index = {id(r): i for i, r in enumerate(reqs)}
        return alone, [(index[id(r)], a) for r, a in zip(work, together, strict=True)], stats

    alone, together, stats = asyncio.run(main())
    assert len(together) == 3 * len(alone) > 150
    for i, answer in together:
        close(alone[i], answer, reqs[i][1])
    # batching did happen: fewer forward passes than requests for the busiest method
    encode = {m["name"]: m["batching"]["encode"] for m in stats["models"]}["vae"]
    assert encode["passes"] < encode["requests"], encode
    # every shared pass was split back as it was: none had to be redone one request at a time
    assert all(b["isolated_passes"] == 0 for m in stats["models"] for b in m["batching"].values()), stats


@pytest.mark.parametrize("k", [16, 64])
def test_scores_do_not_depend_on_batch_neighbours(models_dir: Path, k: int) -> None:
    """DIGITS[0], scored alone and at every place in batches of others, all in flight at once: one score."""
    app = create_app(Settings(models_dir=models_dir, default_model="vae"))
    d0, d1, d2, d3 = DIGITS
    batches = [([d0], 0), ([d1, d0], 1), ([d2, d3, d0], 2), ([d0, d3], 0), ([d3, d0, d1, d2], 1), ([d0], 0)]

    async def main() -> list[float]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                async def score(files: list[bytes], at: int) -> float:
                    sent = [("file", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)]
                    body = (await client.post(f"/anomaly-score?k={k}&seed=4", files=sent)).json()
                    return body["results"][at]["score"] if "results" in body else body["score"]

                return await asyncio.gather(*(score(files, at) for files, at in batches))

    scores = asyncio.run(main())
    assert max(scores) - min(scores) <= 1e-5 * abs(scores[0]), scores
