"""Writes tests/data/: real MNIST test digits as PNG, and a photographed-style digit.

Run once from the repository root: python scripts/make_test_images.py ../shared/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from training.data import load_mnist

OUT = Path("tests/data")


def main(data_dir: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = load_mnist(data_dir, allow_download=False)
    for index in (0, 1, 2, 3):
        label = int(data.test_labels[index])
        Image.fromarray(data.test_images[index].numpy(), "L").save(OUT / f"mnist_test_{index}_digit_{label}.png")
    # A "photo": test digit 4 in dark ink on light, unevenly lit paper; non-square, blurred, noisy, RGB JPEG.
    ink = np.asarray(Image.fromarray(data.test_images[4].numpy(), "L").resize((120, 120), Image.Resampling.BICUBIC),
                     dtype=np.float64) / 255.0
    paper = np.linspace(235, 205, 160)[None, :] * np.ones((200, 1))
    paper[40:160, 20:140] *= 1.0 - 0.8 * ink
    blurred = np.asarray(Image.fromarray(paper.astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.2)), float)
    gray = blurred + np.random.default_rng(0).normal(0, 6, blurred.shape)
    rgb = np.stack([gray, gray * 0.97, gray * 0.92], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(OUT / f"photo_dark_on_light_digit_{int(data.test_labels[4])}.jpg", quality=85)
    # Uniform noise: something that is no digit at all.
    noise = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise, "L").save(OUT / "noise_28x28.png")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist")
