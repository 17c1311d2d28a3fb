"""The same TorchScript encoder served by TorchServe: a custom handler, as TorchServe's docs write one
for an image model. bench/frameworks.py archives it with torch-model-archiver (`models/vae.pt` as the
serialized file) and starts TorchServe with it, without and with TorchServe's batching (batchSize 32,
maxBatchDelay 5 ms), one worker.

The request is the PNG itself (POST /predictions/vae, as `vae-serve`'s `/encode` takes it),
decoded with Pillow in `preprocess`, the encoder run on the batch in `inference`, and mu and logvar
returned as JSON, one answer per request of the batch. Needs `pip install torchserve
torch-model-archiver` and a Java runtime (Debian: openjdk-17-jre-headless).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class EncoderHandler(BaseHandler):
    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            image = Image.open(io.BytesIO(body)).convert("L")
            images.append(np.asarray(image, dtype=np.float32) / 255)
        return torch.from_numpy(np.stack(images)).reshape(-1, 1, 28, 28)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.model.encode(data.to(self.device))

    def postprocess(self, data: tuple[torch.Tensor, torch.Tensor]) -> list[dict[str, list[float]]]:
        mu, logvar = data
        return [{"mu": m.tolist(), "logvar": lv.tolist()} for m, lv in zip(mu.cpu(), logvar.cpu(), strict=True)]
