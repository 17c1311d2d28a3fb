"""Model inputs and outputs as tensors and PNGs: the torch side of images.

app/preprocess.py turns any image file into a 28x28 grey digit (its docstring lists the
steps); this module adds the fast path for small 28x28 grey PNGs (libpng through
torchvision, on the event loop), the conversion to float32 tensors, and PNG encoding of
model outputs.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from app import preprocess
from app.preprocess import FAST_PNG_BYTES, PNG_CHEAP, PngHeader, Preprocess, png_chunks, png_header

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the
# fastest here for small PNGs (docs/benchmarks.md#serving), so keep them while they exist.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

try:
    from torchvision.io import ImageReadMode, encode_png

    _decode_png = torch.ops.image.decode_png  # registered by importing torchvision.io
except (ImportError, AttributeError, RuntimeError):
    # torchvision built without its image library, or for another torch (a CUDA build under a
    # CPU-only torch fails on import): Pillow does it all, slower but the same pixels.
    encode_png, _decode_png = None, None
def is_small_gray(header: PngHeader | None) -> bool:
    """The header of a 28x28 8-bit grey PNG, which libpng decodes in microseconds (see _fast_png)."""
    return _decode_png is not None and header == (28, 28, 8, 0)


def is_fast_png(data: bytes, header: PngHeader | None) -> bool:
    """A 28x28 8-bit grey PNG that libpng decodes in microseconds, whatever else it holds: small, and made
    only of PNG_CHEAP chunks. The event loop decodes these; everything else goes to a decoder process."""
    if not is_small_gray(header) or len(data) > FAST_PNG_BYTES:
        return False
    chunks = png_chunks(data)
    return chunks is not None and all(kind in PNG_CHEAP for kind, _, _ in chunks)


def _fast_png(data: bytes, header: PngHeader | None) -> np.ndarray | None:
    """The pixels of a PNG that `is_fast_png` admits, decoded by libpng; None for any other file."""
    return _libpng_gray(data) if is_fast_png(data, header) else None


def _libpng_gray(data: bytes) -> np.ndarray | None:
    """8-bit grayscale 28x28 PNG (what MNIST tooling writes) decoded by libpng via torchvision, for a
    file already found to be one (`is_fast_png`).

    The op is called directly: torchvision's Python wrapper adds a deprecation warning
    and usage logging that cost as much as the decode itself. It applies a PNG's EXIF
    orientation, as the Pillow path does for every format (about 1 us more).
    """
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return _decode_png(encoded, ImageReadMode.GRAY.value, True).numpy()[0]
    except RuntimeError:
        return None  # let Pillow produce the user-facing error


def gray28(data: bytes, header: PngHeader | None, max_pixels: int, prep: Preprocess) -> np.ndarray:
    """preprocess.gray28, with libpng decoding the small grey PNGs it can."""
    return preprocess.gray28(data, header, max_pixels, prep, _fast_png(data, header))


def fast_gray28(data: bytes, header: PngHeader | None, max_pixels: int, prep: Preprocess) -> np.ndarray:
    """`gray28` for a file the caller already found `is_fast_png`: its chunks are not walked again."""
    return preprocess.gray28(data, header, max_pixels, prep, _libpng_gray(data))


SCREEN_TOGETHER = 4  # bench.asgi: one file screened alone costs 25 µs more than `gray28`'s own checks


def _or_error(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        return e


def fast_gray28_many(files: list[tuple[bytes, PngHeader | None, Preprocess]], max_pixels: int
                     ) -> list[np.ndarray | Exception]:
    """`fast_gray28` of many files at once (those of one event-loop turn): each decoded, then screened
    together (`preprocess.unchanged`); only the images that need a step go through `gray28`, with the
    pixels already decoded. A file that fails answers its Exception, for its own request alone. Below
    SCREEN_TOGETHER files the screening's fixed cost is more than it saves: each goes alone."""
    if len(files) < SCREEN_TOGETHER:
        return [_or_error(fast_gray28, data, header, max_pixels, prep) for data, header, prep in files]
    decoded: list[np.ndarray | Exception] = []
    for data, _, _ in files:
        try:
            decoded.append(_libpng_gray(data))
        except Exception as e:
            decoded.append(e)
    kept = np.zeros(len(files), bool)
    for (fit, thin) in {(p.fit, p.thin) for _, _, p in files if p.invert != "true"}:  # one screening per option set
        rows = [i for i, (_, _, p) in enumerate(files) if (p.fit, p.thin) == (fit, thin) and p.invert != "true"
                and isinstance(decoded[i], np.ndarray) and decoded[i].shape == (28, 28)]
        if rows:
            kept[rows] = preprocess.unchanged(np.stack([decoded[i] for i in rows]), fit, thin)
    out: list[np.ndarray | Exception] = []
    for i, ((data, header, prep), gray) in enumerate(zip(files, decoded, strict=True)):
        if isinstance(gray, Exception) or kept[i]:
            out.append(gray)
            continue
        try:
            out.append(preprocess.gray28(data, header, max_pixels, prep, gray))
        except Exception as e:
            out.append(e)
    return out


def file_to_gray28(data: bytes, max_pixels: int, prep: Preprocess) -> np.ndarray:
    """Image bytes -> uint8 [28, 28], white digit on black: steps 1-5 of app/preprocess.py."""
    return gray28(data, png_header(data), max_pixels, prep)


def file_to_tensor(data: bytes, max_pixels: int, prep: Preprocess) -> torch.Tensor:
    """Image bytes -> float32 [1, 28, 28] in [0, 1], white digit on black."""
    return files_to_tensor([data], max_pixels, prep)[0]


def files_to_tensor(blobs: list[bytes], max_pixels: int, prep: Preprocess) -> torch.Tensor:
    """Image files -> float32 [B, 1, 28, 28]."""
    return grays_to_tensor([file_to_gray28(b, max_pixels, prep) for b in blobs])


def grays_to_tensor(grays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 [28, 28] images (or [B, 28, 28]) -> float32 [B, 1, 28, 28] in [0, 1]; one conversion for the batch.

    In numpy, not torch: the same IEEE division (bit-identical, tested), but a torch op costs
    a dispatcher call, which is slow when the CPU caches are cold, as they are between requests
    (docs/benchmarks.md#serving).
    """
    gray = (grays if isinstance(grays, np.ndarray) else np.stack(grays)).astype(np.float32)
    gray /= 255
    return torch.from_numpy(gray[:, None])


def pixels_to_tensor(pixels: list[list[float]]) -> torch.Tensor:
    """A JSON 28x28 array in [0, 1] -> float32 [1, 28, 28]; validation is the caller's (pydantic)."""
    return torch.tensor(pixels, dtype=torch.float32).unsqueeze(0)


def to_png(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """[B,1,H,W] in [0,1] -> one PNG; a batch becomes a grid (nrow per row, square by default).

    zlib level 1: for these small images it encodes much faster than level 6 for a few more bytes
    (docs/benchmarks.md#serving).
    """
    images = images.detach().float().cpu().clamp(0, 1)
    picture = images[0] if images.shape[0] == 1 else grid(images, nrow or math.ceil(math.sqrt(images.shape[0])))
    pixels = picture.mul(255).round().to(torch.uint8)
    if encode_png is None:
        return pil_to_png(Image.fromarray(pixels[0].numpy(), "L"))
    return encode_png(pixels, compression_level=1).numpy().tobytes()


def pil_to_png(image: Image.Image) -> bytes:
    """zlib level 1, as `to_png`: pictures made with Pillow, and `to_png` without torchvision."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.5) -> torch.Tensor:
    """torchvision's make_grid for one channel, pixel for pixel, in a few tensor ops instead of one
    copy per image (docs/benchmarks.md#serving)."""
    b, _, h, w = images.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    th, tw = h + padding, w + padding  # each tile: padding above and left of its image
    tiles = images.new_full((nrows * ncol, th, tw), pad_value)
    tiles[:b, padding:, padding:] = images[:, 0]
    out = images.new_full((1, nrows * th + padding, ncol * tw + padding), pad_value)
    out[0, : nrows * th, : ncol * tw] = tiles.reshape(nrows, ncol, th, tw).permute(0, 2, 1, 3).reshape(nrows * th, -1)
    return out
