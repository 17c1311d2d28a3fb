"""The same TorchScript encoder served by KServe's own Python model server (kserve.ModelServer):
what a user would run instead of this service, on the same model and the same Open Inference
Protocol payload. bench/frameworks.py starts it and measures it beside `vae-serve`.

    python -m bench.kserve_encoder --http_port 8080 --model_path models/vae.pt

Logging as `vae-serve` runs in the benchmark: warnings only, no line per request.

The model is written as KServe's docs write a custom model: load in `load`, tensors in and out
through its InferRequest/InferResponse types, one forward pass per request (KServe's Python
server has no dynamic batching of its own).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server as kserve_model_server


class Encoder(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.module: torch.jit.ScriptModule | None = None
        self.load()

    def load(self) -> bool:
        self.module = torch.jit.load(self.path, map_location="cpu").eval()
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        pixels = payload.inputs[0].as_numpy()
        x = torch.from_numpy(pixels.astype(np.float32) / 255).reshape(-1, 1, 28, 28)
        with torch.no_grad():
            mu, logvar = self.module.encode(x)
        outputs = []
        for name, value in (("mu", mu), ("logvar", logvar)):
            out = InferOutput(name, list(value.shape), "FP32")
            out.set_data_from_numpy(value.numpy(), binary_data=True)
            outputs.append(out)
        return InferResponse(payload.id, self.name, outputs, use_binary_outputs=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve_model_server.parser], add_help=False)
    parser.add_argument("--model_path", default="models/vae.pt")
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
    ModelServer(http_port=args.http_port, workers=1, enable_grpc=False, enable_latency_logging=False).start(
        [Encoder("vae.encode", args.model_path)])
