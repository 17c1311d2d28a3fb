"""Why an image scored as it did: a picture per image for `POST /anomaly-score?format=png`.

Each row shows the input as the model saw it (after preprocessing), its reconstruction, and
where the model finds the input unlikely: the per-pixel Bernoulli -log p(x_i | z = mu), the
terms the likelihood part of every score sums. The colour scale is fixed (0 to HEAT_MAX nats
per pixel, matplotlib's "hot" ramp) so that pictures compare across images and requests.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from app.imaging import pil_to_png
from app.inference import Scores

SCALE = 4  # 28 px -> 112 px, nearest neighbour: pixels stay pixels
HEAT_MAX = 6.0  # nats per pixel at full heat; a pixel predicted with p=0.0025 the wrong way
TEXT_W = 190
PAD = 4
BACKGROUND = (32, 32, 32)
SIDE = 28 * SCALE  # one tile
WIDTH = 3 * SIDE + 4 * PAD + TEXT_W  # three tiles and the text


def pixel_nll(x: Tensor, recon: Tensor) -> Tensor:
    """-log p(x_i | z) per pixel for Bernoulli means `recon`, continuous x in [0, 1] (cross-entropy)."""
    return F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), x, reduction="none")


def hot(values: np.ndarray) -> np.ndarray:
    """matplotlib's "hot" colour map, [H, W] in [0, 1] -> uint8 [H, W, 3]: black, red, yellow, white."""
    v = np.clip(values, 0, 1)[..., None] * 3 - np.array([0.0, 1.0, 2.0])
    return (np.clip(v, 0, 1) * 255).round().astype(np.uint8)


def _tile(gray01: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(gray01, 0, 1) * 255).round().astype(np.uint8), "L").convert("RGB").resize(
        (SIDE, SIDE), Image.Resampling.NEAREST)


@lru_cache(maxsize=1)
def _titles() -> Image.Image:
    """The column titles, drawn once (rendering text is half of a picture's cost) and only read after,
    so the threads that draw pictures can share it; each picture draws its own lines with a font of
    its own, since a FreeType face is not safe to share between threads."""
    strip = Image.new("RGB", (WIDTH, 18), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=13)
    for i, title in enumerate(("input (as seen)", "reconstruction", f"-log p(x_i|z), 0-{HEAT_MAX:g} nats")):
        draw.text((PAD + i * (SIDE + PAD), 3), title, fill=(220, 220, 220), font=font)
    return strip


def anomaly_picture(x: Tensor, recon: Tensor, scores: Scores) -> bytes:
    """One row per image: input | reconstruction | heat map | score, percentile and verdict; as a PNG."""
    x, recon = x.detach().float().cpu(), recon.detach().float().cpu()
    n = x.shape[0]
    heat = pixel_nll(x, recon)
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (WIDTH, 18 + n * (SIDE + PAD) + PAD), BACKGROUND)
    sheet.paste(_titles(), (0, 0))
    draw = ImageDraw.Draw(sheet)
    for row in range(n):
        top = 18 + row * (SIDE + PAD)
        tiles = [_tile(x[row, 0].numpy()), _tile(recon[row, 0].numpy()),
                 Image.fromarray(hot(heat[row, 0].numpy() / HEAT_MAX), "RGB").resize((SIDE, SIDE),
                                                                                     Image.Resampling.NEAREST)]
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (PAD + i * (SIDE + PAD), top))
        r = scores.results[row]
        verdict = "no calibration" if r.is_anomaly is None else ("ANOMALY" if r.is_anomaly else "looks like a digit")
        colour = (255, 110, 90) if r.is_anomaly else (150, 230, 150)
        lines = [f"{scores.method} score {r.score:.2f}",
                 "percentile " + ("-" if r.percentile is None else f"{r.percentile:.1f}"),
                 f"threshold p{scores.threshold_percentile:g}" + ("" if scores.threshold is None
                                                                  else f" = {scores.threshold:.2f}"),
                 f"pixel -log p sum {float(heat[row].sum()):.1f}", f"k={scores.k}"]
        tx = PAD + 3 * (SIDE + PAD)
        draw.text((tx, top + 4), verdict, fill=colour, font=font)
        for j, line in enumerate(lines):
            draw.text((tx, top + 24 + 16 * j), line, fill=(220, 220, 220), font=font)
    return pil_to_png(sheet)

