"""The same TorchScript encoder served by BentoML: what a user would write instead of this service,
on the same model and the same multipart upload. bench/frameworks.py starts it and measures it
beside `vae-serve`.

    VAE_BENCH_MODEL=models/vae.pt VAE_BENCH_BATCH=64 bentoml serve bench.bentoml_encoder:Encoder --port 8080

Written as BentoML's docs write an image service: a `PIL.Image.Image` parameter (so the route
takes a multipart form with a file field, here `file`, as `vae-serve`'s `/encode` does), the model
loaded in `__init__`, mu and logvar returned as JSON. `VAE_BENCH_BATCH` > 1 turns on BentoML's
adaptive batching (`batchable=True`, up to that many images, with its default latency bound: with
`max_latency_ms=10` it refused 1,456 of ~1,490 requests in 5 s at c=32); 1 serves one request per call.
One worker. Needs `pip install bentoml` (the `bench` extra).
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import torch
from PIL.Image import Image

MODEL = os.environ.get("VAE_BENCH_MODEL", "models/vae.pt")
BATCH = int(os.environ.get("VAE_BENCH_BATCH", "1"))


def to_tensor(images: list[Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("L"), dtype=np.float32) / 255 for i in images]))


@bentoml.service(workers=1, logging={"access": {"enabled": False}})  # no line per request, as vae-serve here
class Encoder:
    def __init__(self) -> None:
        self.module = torch.jit.load(MODEL, map_location="cpu").eval()

    def _encode(self, images: list[Image]) -> list[dict[str, list[float]]]:
        with torch.no_grad():
            mu, logvar = self.module.encode(to_tensor(images).reshape(-1, 1, 28, 28))
        return [{"mu": m.tolist(), "logvar": lv.tolist()} for m, lv in zip(mu, logvar, strict=True)]

    if BATCH > 1:
        @bentoml.api(route="/encode", batchable=True, max_batch_size=BATCH)  # BentoML's default max latency
        def encode(self, file: list[Image]) -> list[dict[str, list[float]]]:
            return self._encode(file)
    else:
        @bentoml.api(route="/encode")
        def encode(self, file: Image) -> dict[str, list[float]]:
            return self._encode([file])[0]
