"""The same TorchScript encoder served by Ray Serve: a deployment as Ray Serve's docs write one for a
model, with `@serve.batch` (up to 32 requests, 1 ms wait) or without. bench/frameworks.py starts it
and measures it beside `vae-serve`.

    python -m bench.rayserve_encoder --port 8080 --model-path models/vae.pt [--max-batch-size 32]

The request is the PNG itself (POST /encode, as `vae-serve` takes it), decoded with Pillow, the
encoder run on the batch, and mu and logvar returned as JSON. One replica, Ray started locally with
the machine's cores and no dashboard. Needs `pip install "ray[serve]"`.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve
from starlette.requests import Request


def to_tensor(pngs: list[bytes]) -> torch.Tensor:
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=np.float32) / 255 for b in pngs]
    return torch.from_numpy(np.stack(images)).reshape(-1, 1, 28, 28)


# max_ongoing_requests: Ray's default (5) queues the rest in its proxy, which at 32 connections answered 11 req/s
@serve.deployment(num_replicas=1, max_ongoing_requests=64)
class Encoder:
    def __init__(self, path: str, max_batch_size: int) -> None:
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.batched = max_batch_size > 1
        self.encode_batch.set_max_batch_size(max_batch_size)

    def _encode(self, pngs: list[bytes]) -> list[dict[str, list[float]]]:
        with torch.no_grad():
            mu, logvar = self.module.encode(to_tensor(pngs))
        return [{"mu": m.tolist(), "logvar": lv.tolist()} for m, lv in zip(mu, logvar, strict=True)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def encode_batch(self, pngs: list[bytes]) -> list[dict[str, list[float]]]:
        return self._encode(pngs)

    async def __call__(self, request: Request) -> dict[str, list[float]]:
        body = await request.body()
        if self.batched:
            return await self.encode_batch(body)
        return self._encode([body])[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-path", default="models/vae.pt")
    p.add_argument("--max-batch-size", type=int, default=1, help="1: no batching")
    args = p.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"enable_access_log": False,
                                                                                         "log_level": "WARNING"})
    serve.run(Encoder.bind(args.model_path, args.max_batch_size), route_prefix="/encode")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
