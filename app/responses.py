"""Each endpoint's answer, shaped from what the Engine returned, in the negotiated format.

One image sent gets a flat answer, several get `results` in request order; image answers
are a PNG (a grid for several) or JSON with pixel arrays or base64 PNGs.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import asdict
from typing import Any

import numpy as np
import pydantic_core
import torch
from fastapi.responses import JSONResponse, Response
from torch import Tensor

from app.explain import anomaly_picture
from app.formats import MEDIA, Format
from app.imaging import to_png
from app.inference import Sample, Scores
from app.neighbours import NeighbourIndex, Neighbours
from app.tracing import traced


class JsonResponse(JSONResponse):
    """JSON rendered by pydantic-core (Rust): float arrays serialise many times faster than with the stdlib.

    Routes return it directly, which also skips FastAPI's re-validation of what was just built.
    """

    def render(self, content: object) -> bytes:
        return pydantic_core.to_json(content)


class PngResponse(Response):
    media_type = MEDIA["png"]


def pixels(images: Tensor) -> list[list[list[float]]]:
    """[B,1,28,28] -> B 28x28 arrays, rounded to 5 decimals (a 1e-5 step is far below one grey level).

    The same floats as Python's round(v, 5), in numpy: a float32 times 1e5 is exact in float64 (24 + 17
    bits), so rint rounds the exact value half to even as round() does, and k / 1e5 is the double
    nearest k/10^5, which is what round() returns. 256 images took 1.4 s of the event loop one value at a
    time."""
    scaled = images[:, 0].detach().cpu().numpy().astype(np.float64) * 1e5
    return (np.rint(scaled) / 1e5).tolist()


@traced("encode answer")
def images(fmt: Format, encoding: str, imgs: Tensor, payload: dict[str, Any], png: Tensor | None = None,
           nrow: int | None = None, headers: dict[str, str] | None = None) -> Response:
    """`imgs` as a PNG grid (or `png`, when the picture differs from the JSON images) or as JSON `payload` + images."""
    if fmt == "png":
        return PngResponse(to_png(imgs if png is None else png, nrow), headers=headers)
    if encoding == "base64":
        payload["png_base64"] = [base64.b64encode(to_png(img[None])).decode() for img in imgs]
    else:
        payload["images"] = pixels(imgs)
    return JsonResponse({k: v for k, v in payload.items() if v is not None}, headers=headers)


@traced("encode answer")
def encoded(model: str, latent_dim: int, mu: Tensor, logvar: Tensor) -> JsonResponse:
    out: dict[str, Any] = {"model": model, "latent_dim": latent_dim}
    if mu.shape[0] == 1:
        out["mu"], out["logvar"] = mu.tolist()[0], logvar.tolist()[0]
    else:
        out["results"] = [{"mu": m, "logvar": lv} for m, lv in zip(mu.tolist(), logvar.tolist(), strict=True)]
    return JsonResponse(out)


@traced("encode answer")
def sampled(fmt: Format, encoding: str, model: str, sample: Sample) -> Response:
    payload = {"model": model, "seed": sample.seed, "z": sample.z.tolist()}
    return images(fmt, encoding, sample.images, payload, headers={"X-Seed": str(sample.seed)})


@traced("encode answer")
def interpolated(fmt: Format, encoding: str, model: str, path: str, z: Tensor, imgs: Tensor) -> Response:
    """PNG: one strip, first to last; JSON: the path's latents and images."""
    return images(fmt, encoding, imgs, {"model": model, "path": path, "z": z.tolist()}, nrow=imgs.shape[0])


@traced("encode answer")
def neighbours(fmt: Format, model: str, x: Tensor, found: Neighbours, index: NeighbourIndex) -> Response:
    """PNG: a row per image, the image (as the model saw it) then its neighbours, nearest first; JSON: their
    rows of the training set, digits and distances."""
    rows = found.index.cpu().numpy()
    if fmt == "png":
        tiles = np.concatenate([x[:, None].cpu().numpy(),
                                index.images[rows][:, :, None].astype(np.float32) / 255], axis=1)
        return PngResponse(to_png(torch.from_numpy(tiles.reshape(-1, 1, 28, 28)), rows.shape[1] + 1))
    labels = index.labels[rows].tolist()
    found_lists = [[{"index": i, "label": y, "distance": d} for i, y, d in zip(r, ys, ds, strict=True)]
                   for r, ys, ds in zip(rows.tolist(), labels, found.distance.tolist(), strict=True)]
    out: dict[str, Any] = {"model": model, "k": rows.shape[1]}
    if len(found_lists) == 1:
        out["neighbours"] = found_lists[0]
    else:
        out["results"] = [{"neighbours": f} for f in found_lists]
    return JsonResponse(out)


@traced("encode answer")
def reconstructed(fmt: Format, encoding: str, model: str, x: Tensor, recon: Tensor) -> Response:
    """PNG: rows of original | reconstruction; JSON: the reconstructions, and the preprocessed originals."""
    pairs = torch.stack([x, recon], dim=1).reshape(-1, *x.shape[1:])  # original, reconstruction, ...
    payload: dict[str, Any] = {"model": model}
    if fmt == "json" and encoding == "pixels":
        payload["originals"] = pixels(x)
    return images(fmt, encoding, recon, payload, png=pairs, nrow=2)


@traced("encode answer")
def scored(model: str, scores: Scores) -> JsonResponse:
    out: dict[str, Any] = {"model": model, "method": scores.method, "k": scores.k, "threshold": scores.threshold,
                           "threshold_percentile": scores.threshold_percentile, "calibration_k": scores.calibration_k}
    if len(scores.results) == 1:
        out.update(asdict(scores.results[0]))
    else:
        out["results"] = [asdict(s) for s in scores.results]
    return JsonResponse(out)


@traced("encode answer")
async def explained(x: Tensor, recon: Tensor, scores: Scores) -> PngResponse:
    """Drawn on a worker thread: Pillow takes ~3 ms per image (200 ms for a batch of 64), which on the
    event loop would hold up every other request and the health probes."""
    return PngResponse(await asyncio.to_thread(anomaly_picture, x, recon, scores))
