"""The same TorchScript encoder served by LitServe (Lightning AI's serving framework): what a user
would write instead of this service, on the same model and the same JSON payload. bench/frameworks.py
starts it and measures it beside `vae-serve`.

    python -m bench.litserve_encoder --port 8080 --model-path models/vae.pt [--max-batch-size 64]

Written as LitServe's docs write an image model: the request is JSON with the PNG in base64
(LitServe takes JSON or forms, not a raw body), decoded with Pillow in `decode_request`, the
encoder run in `predict` (on a batch when `--max-batch-size` > 1, LitServe's dynamic batching),
and mu and logvar returned as JSON lists. LitServe runs the model in a worker process of its own
beside the HTTP server process. Needs `pip install litserve` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging

import litserve as ls
import numpy as np
import torch
from PIL import Image


class Encoder(ls.LitAPI):
    def __init__(self, path: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.path = path

    def setup(self, device: str) -> None:
        self.device = device
        self.module = torch.jit.load(self.path, map_location=device).eval()

    def decode_request(self, request: dict) -> torch.Tensor:
        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("L")
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).reshape(1, 28, 28)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mu, logvar = self.module.encode(x.reshape(-1, 1, 28, 28).to(self.device))
        return mu.cpu(), logvar.cpu()

    def unbatch(self, output: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mu, logvar = output
        return list(zip(mu, logvar, strict=True))

    def encode_response(self, output: tuple[torch.Tensor, torch.Tensor]) -> dict:
        mu, logvar = output
        return {"mu": mu.reshape(-1).tolist(), "logvar": logvar.reshape(-1).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-path", default="models/vae.pt")
    p.add_argument("--max-batch-size", type=int, default=1, help="1: no batching (LitServe's default)")
    p.add_argument("--batch-timeout", type=float, default=0.001, help="seconds a batch waits to fill")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--fast-queue", action="store_true", help="ZeroMQ between server and worker (LitServe's "
                   "advice above 100 requests per second)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    api = Encoder(args.model_path, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=1, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
