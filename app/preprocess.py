"""Image files to 28x28 grey digits the way MNIST's were made, with Pillow and numpy only.

What happens to an uploaded image, in order:
1. decode with Pillow (app/imaging.py decodes small 28x28 grey PNGs with libpng instead:
   it skips Pillow's object overhead on the hot path); a PNG's width x height is checked
   against the pixel limit *before* decoding, every other format's by Pillow as it opens
   it (decompression bombs); a PNG's chunks other than those it is drawn from are dropped
   first (compressed text and profiles are inflated by decoders before any pixel);
2. transparency is flattened onto white, 16-bit images are scaled to 8 bits, and the
   result is converted to 8-bit grayscale;
1b. the EXIF orientation is applied (phone photos are often stored sideways);
3. `invert=auto`: if the ink is darker than the background (the border's median grey
   lies nearer the brightest pixel than the darkest: a dark digit on paper), the image
   is inverted to the MNIST convention of a white digit on black;
4. background levelling: if the border is not black (paper), the paper becomes black and
   the brightest pixel white (a no-op for MNIST images); on images of 128 px or more the
   paper's grey is a smooth surface fitted to it, so light falling off across a photo or
   into its corners is levelled too (`_paper`);
5. `fit=true`, for images not already 28x28: cropped to the digit's bounding box (less
   specks of dust or stray dots, `_without_specks`),
   scaled to fit 20x20 keeping its aspect ratio and placed on a black 28x28 canvas with
   its centre of mass at the centre, which is how MNIST itself was made (never stretched);
   pen strokes much thinner than the scale step are max-pooled first, so that they are
   not averaged away;
   A 28x28 image (with `fit=true`) is not scaled: it is moved by whole pixels so that its centre
   of mass is there too (`recentred`; a no-op for MNIST's digits);
6. `fit=true`: strokes bolder than MNIST's boldest are thinned to an ordinary width (`thinned`);
7. pixels become float32 in [0, 1] (app/imaging.py).

`fit=false` takes a 28x28 image where it is, as it is drawn: steps 5 and 6 are skipped.

No torch here: the decoder processes (app/decoders.py) import this module alone.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from app.exceptions import EmptyImage, ImageTooLarge, UndecodableImage, WrongImageSize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Preprocess:
    invert: Literal["auto", "true", "false"] = "auto"
    fit: bool = True
    thin: bool = True  # step 6 (with fit); not a request option: tests of the fit alone turn it off


PngHeader = tuple[int, int, int, int]


def png_header(data: bytes) -> PngHeader | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


# What a PNG needs to be drawn as we draw it; everything else (text, ICC profiles, animation frames after
# the first, private chunks) is left out before a decoder sees the file. libpng inflates every compressed
# text chunk (zTXt, iTXt) and ICC profile (iCCP) while it reads the header: 1,000 of them in 8.8 MB froze
# the event loop for 43 s.
PNG_DRAWN = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"eXIf"})
# Also allowed on the fast path: small fixed-size or uncompressed chunks that libpng reads in microseconds.
PNG_CHEAP = PNG_DRAWN | {b"tEXt", b"pHYs", b"gAMA", b"sRGB", b"cHRM", b"tIME", b"bKGD", b"sBIT"}
# A 28x28 8-bit grey PNG is 100-900 bytes (uncompressed: 900); the fast path takes none larger than this.
FAST_PNG_BYTES = 4096


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """Each chunk's (type, start, end) in `data`, end after its CRC; None when the chunk structure is
    broken (the decoder then says what is wrong). Reads the 8-byte chunk heads only."""
    chunks, offset, n = [], len(PNG_SIGNATURE), len(data)
    while offset + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if end > n:
            return None
        chunks.append((kind, offset, end))
        offset = end
        if kind == b"IEND":
            break
    return chunks if chunks and chunks[-1][0] == b"IEND" else None


def drawn_png(data: bytes) -> bytes:
    """A PNG with only the chunks it is drawn from (PNG_DRAWN): the same image, nothing for a decoder to
    inflate but the pixels. Anything else, or a PNG whose chunks do not parse, is returned as it is."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    chunks = png_chunks(data)
    if chunks is None or all(kind in PNG_DRAWN for kind, _, _ in chunks):
        return data
    return b"".join([PNG_SIGNATURE, *(data[a:b] for kind, a, b in chunks if kind in PNG_DRAWN)])


def _to_gray(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    # An alpha channel, or a transparent colour (PNG's tRNS chunk: palette, grey or RGB images): the
    # transparent parts are paper, so they go onto white
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return im.convert("L")


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    """Pillow's decoders, with the pixel limit checked by Pillow itself as it opens each image: some
    plugins decode while they open (an ICO's embedded PNG), and an image inside another (ICO, ICNS,
    MPO) is opened the same way, so a check after `Image.open` would come too late."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels  # Pillow warns above it: an error here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(drawn_png(data)))
            width, height = im.size
            check_pixels(width, height, max_pixels)
            im.seek(0)  # first frame of an animation
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: stored sideways, with an Orientation tag
            return np.asarray(_to_gray(im), dtype=np.uint8)
    except UnidentifiedImageError as e:  # its message is the repr of our BytesIO: say what it means instead
        raise UndecodableImage(f"{len(data)} bytes in no image format Pillow reads (PNG, JPEG, GIF, WebP, BMP, "
                               "TIFF, ...)") from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow says how many, not the width and height
        raise ImageTooLarge(f"{found[1] if found else 'more than the limit of'} pixels; the limit is {max_pixels} "
                            "pixels (VAE_MAX_IMAGE_PIXELS)") from e
    except MemoryError as e:
        raise ImageTooLarge("decoding this image needs more memory than a decoder process may use "
                            "(VAE_MAX_IMAGE_PIXELS sets both)") from e
    except (OSError, SyntaxError, ValueError, EOFError, RecursionError, struct.error) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous  # a process-wide setting: Pillow elsewhere keeps its own


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels; the limit is {max_pixels} pixels (VAE_MAX_IMAGE_PIXELS)")


def files_to_grays(blobs: list[bytes], max_pixels: int, prep: Preprocess) -> np.ndarray:
    """Image files -> uint8 [B, 28, 28]: what a decoder process runs for one request (app/decoders.py)."""
    return np.stack([gray28(b, png_header(b), max_pixels, prep) for b in blobs]) if blobs else np.zeros((0, 28, 28),
                                                                                                        np.uint8)


def gray28(data: bytes, header: PngHeader | None, max_pixels: int, prep: Preprocess,
           decoded: np.ndarray | None = None) -> np.ndarray:
    """`file_to_gray28` for a caller that has read the PNG header already (png_header: None if no PNG);
    `decoded`: the file's grey pixels when a faster decoder already has them (app/imaging.py)."""
    if not data:
        raise EmptyImage("the request carried no image bytes")
    if header is not None:
        check_pixels(header[0], header[1], max_pixels)
    gray = decoded if decoded is not None else _decode_pillow(data, max_pixels)
    border = _border(gray)
    if np.count_nonzero(border) or prep.invert == "true":  # an all-black border (MNIST itself) needs neither step
        if _should_invert(gray, border, prep.invert):
            gray = 255 - gray
            border = 255 - border
        gray = _level_background(gray, border)
    if gray.shape != (28, 28):
        if not prep.fit:
            raise WrongImageSize(f"image is {gray.shape[1]}x{gray.shape[0]}; with fit=false it must be 28x28")
        gray = _fit_like_mnist(gray)
    elif prep.fit:
        gray = recentred(gray)
    return thinned(gray) if prep.fit and prep.thin else gray


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _level_background(gray: np.ndarray, border: np.ndarray) -> np.ndarray:
    background, top = float(np.median(border)), float(gray.max())
    if background <= 0 or top <= background:
        return gray
    if max(gray.shape) < 2 * PAPER_SIDE:  # a small image: one grey for all of it
        return np.clip((gray.astype(np.float32) - background) * (255.0 / (top - background)), 0, 255).astype(np.uint8)
    flat = np.subtract(gray, _paper(gray), dtype=np.int16).clip(0, 255).astype(np.uint8)
    top = int(flat.max())
    if top == 0:
        return gray
    return (np.arange(256) * (255.0 / top)).clip(0, 255).astype(np.uint8)[flat]  # uint8 throughout: pages are big


PAPER_SIDE = 64  # the paper's light is fitted on a copy this large (32 px: 1.4 ms less, a little worse)


def _paper(gray: np.ndarray) -> np.ndarray:
    """The paper's grey at every pixel (ink already bright on dark), for a page lit unevenly: a phone photo's
    light falls off across the page and into its corners, so one grey (the border's) leaves a band or the
    corners as faint ink, which then widens the crop and shrinks the digit (research/scan_fidelity.py).

    A quadratic surface in x and y, least squares on a copy shrunk to 64 px, refitted to the pixels within
    3 robust standard deviations of it until the ink (far above it) is left out. A surface that smooth
    follows a gradient or a vignette but not a stroke, so a digit that fills the photo keeps its ink; a
    local filter (a percentile per window) hollowed thick strokes of tightly cropped digits."""
    h, w = gray.shape
    scale = PAPER_SIDE / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    values = np.asarray(Image.fromarray(gray, "L").resize((sw, sh), Image.Resampling.BOX), np.float64).ravel()
    y, x = (a.ravel() for a in np.mgrid[0:sh, 0:sw] / max(sh, sw) - 0.5)
    terms = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1)
    paper = values <= np.median(values)  # ink covers less than half of a photo of one digit
    for _ in range(4):
        fit = terms[paper]
        coef = np.linalg.solve(fit.T @ fit + 1e-9 * np.eye(6), fit.T @ values[paper])  # 6 unknowns: normal equations
        residual = values - terms @ coef
        paper = residual < 3 * (1.4826 * np.median(np.abs(residual[paper])) + 1)
    surface = np.rint(terms @ coef).clip(0, 255).astype(np.uint8).reshape(sh, sw)
    return np.asarray(Image.fromarray(surface, "L").resize((w, h), Image.Resampling.BILINEAR))


def _fit_like_mnist(gray: np.ndarray) -> np.ndarray:
    top = int(gray.max())
    ink = _without_specks(gray > 0.2 * max(top, 1), gray)
    ys, xs = np.nonzero(ink)
    if len(xs):
        gray = gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = gray.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # as ImageOps.contain, but never 0 wide
    digit = np.asarray(Image.fromarray(gray, "L").resize(size, Image.Resampling.LANCZOS))
    if top and int(digit.max()) < top // 2:
        digit = _thin_strokes_kept(gray, size, top)  # which gives them MNIST's ink itself
    else:
        digit = _saturated(digit)
    return centred_by_mass(digit)


def _saturated(digit: np.ndarray) -> np.ndarray:
    """The strokes brought to MNIST's ink: half of an MNIST digit's ink (its pixels above half the brightest)
    is at 250-255, a flat-topped stroke. A scan or a photo shrunk to 20 px has rounder strokes that peak in
    a few pixels, and the model finds them unlikely: until this step the bound flagged 5-50% of scanned and
    photographed MNIST digits, and the default score 7% of those drawn with a marker (research/scan_fidelity.py).
    So the median of that ink becomes 255."""
    ink = digit[digit > digit.max() // 2]
    core = float(np.median(ink)) if ink.size else 0.0
    if core <= 0:
        return digit
    return np.clip(np.rint(digit.astype(np.float32) * (255.0 / core)), 0, 255).astype(np.uint8)


def centred_by_mass(digit: np.ndarray) -> np.ndarray:
    """A digit fitted into 20x20 on a black 28x28 canvas with its centre of mass at pixel (14, 14), which
    is how MNIST was made (LeCun et al.) and where MNIST's digits sit (mean 13.99, 14.01; sd 0.29).
    Centring the bounding box instead moves a digit 1.2 px from there for the median MNIST digit and
    2.6 px at p90, and the model, which has only seen digits at that spot, finds the moved ones less
    likely (research/scan_fidelity.py). Shifted by whole pixels, and never past the canvas's edge."""
    h, w = digit.shape
    mass = digit.astype(np.float32)
    total = mass.sum()
    cy = (mass.sum(1) * np.arange(h)).sum() / total if total else h / 2
    cx = (mass.sum(0) * np.arange(w)).sum() / total if total else w / 2
    y0 = int(np.clip(round(14 - cy), 0, 28 - h))
    x0 = int(np.clip(round(14 - cx), 0, 28 - w))
    canvas = np.zeros((28, 28), dtype=digit.dtype)
    canvas[y0 : y0 + h, x0 : x0 + w] = digit
    return canvas


_AXIS = np.arange(28, dtype=np.int64)


def recentred(gray: np.ndarray) -> np.ndarray:
    """A 28x28 digit moved by whole pixels so that its centre of mass is where MNIST's are (`centred_by_mass`),
    its ink never pushed past the edge: a crop from another dataset, or a canvas scaled down without
    centring, is otherwise a digit the model has never seen at that spot (3 px off: the default score
    flagged 95% of MNIST digits). A no-op for every MNIST digit (all 10,000 test digits: tested)."""
    rows = gray.sum(1, dtype=np.int64)  # integer sums: the moments exactly, whatever the image
    total = int(rows.sum())
    if total == 0 or (round(14 - int(rows @ _AXIS) / total) == 0
                      and round(14 - int(gray.sum(0, dtype=np.int64) @ _AXIS) / total) == 0):
        return gray  # blank, or where MNIST's digits are: nothing to crop or copy
    ys, xs = np.nonzero(gray)
    return centred_by_mass(gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


# Stroke width (`stroke_width`) of MNIST's 10,000 test digits: median 2.0 px, p95 3.1, p99 3.8. A digit drawn
# bolder than BOLD (3% of MNIST's) is thinned to THIN: a 28x28 digit drawn with a 3x3 brush (median width 3.9)
# was "not a digit" to the default score for 56% of MNIST's digits drawn that way; thinned, 3.5% (1,000
# held-out digits, `vae-eval --ood`). Thinning more of MNIST's own bold digits (above 3.0, to 2.0) doubled
# the share of held-out MNIST digits flagged: docs/benchmarks.md#ordinary-variation.
BOLD, THIN = 3.3, 2.2


def unchanged(grays: np.ndarray, fit: bool, thin: bool) -> np.ndarray:
    """Which of these decoded 28x28 images `gray28` (invert other than "true") returns as they are: a black
    border, and with `fit` centred by mass as MNIST's (`recentred`'s test) and with `thin` no bolder than
    BOLD or mostly ink (`thinned`'s). All at once, with the same arithmetic as those functions (integer
    moments, IEEE division, round half to even): a loop turn's uploads screened together cost a few
    µs, where the checks image by image cost ~11 µs each. The rest go through `gray28`."""
    g = grays
    keep = ~(g[:, 0].any(1) | g[:, -1].any(1) | g[:, :, 0].any(1) | g[:, :, -1].any(1))
    if not fit:
        return keep
    rows, cols = g.sum(2, dtype=np.int64), g.sum(1, dtype=np.int64)
    total = rows.sum(1)
    some = np.maximum(total, 1)
    centred = (total == 0) | ((np.rint(14 - (rows @ _AXIS) / some) == 0) & (np.rint(14 - (cols @ _AXIS) / some) == 0))
    keep &= centred
    if thin:
        ink = np.zeros((len(g), 30, 30), bool)  # a blank frame, as stroke_width's
        np.greater(g, 127, out=ink[:, 1:-1, 1:-1])
        area = ink.sum((1, 2))
        outline = (ink[:, 1:] != ink[:, :-1]).sum((1, 2)) + (ink[:, :, 1:] != ink[:, :, :-1]).sum((1, 2))
        width = np.where(area > 0, 2 * area / np.maximum(outline, 1), 0.0)
        keep &= (width <= BOLD) | (area * 2 > 28 * 28)
    return keep


def stroke_width(gray: np.ndarray) -> float:
    """Mean width of the strokes in pixels: 2 x ink area / ink outline (a stroke of width w and length L
    has area wL and an outline of about 2L), on the pixels above half ink."""
    ink = np.zeros((gray.shape[0] + 2, gray.shape[1] + 2), bool)  # a blank frame: ink at the edge has an outline
    np.greater(gray, 127, out=ink[1:-1, 1:-1])
    area = np.count_nonzero(ink)
    if not area:
        return 0.0
    return 2 * area / (np.count_nonzero(ink[1:] != ink[:-1]) + np.count_nonzero(ink[:, 1:] != ink[:, :-1]))


def thinned(gray: np.ndarray) -> np.ndarray:
    """A digit with strokes bolder than BOLD, thinned to THIN: blended with its grey erosion (3x3 minimum,
    which takes one pixel off each side of every stroke and keeps its soft edge) in the share that brings
    the width to THIN, then centred by mass again. Digits no bolder than BOLD, and images mostly ink (a
    photo of paper, noise), are returned as they are."""
    width = stroke_width(gray)
    if width <= BOLD or np.count_nonzero(gray > 127) * 2 > gray.size:  # ink on most of it: no strokes to thin
        return gray
    eroded = np.asarray(Image.fromarray(gray, "L").filter(ImageFilter.MinFilter(3)))  # edges: from inside only
    share = min(1.0, (width - THIN) / max(width - stroke_width(eroded), 1e-6))
    blended = np.rint(gray * (1 - share) + eroded.astype(np.float32) * share).astype(np.uint8)
    return recentred(blended)


SPECK_SHARE = 0.05  # of the largest piece's ink: a "?"'s or an "i"'s dot is 10-20%, a speck of dust far less
SPECK_CELLS = 48  # pieces are found on the ink mask pooled to at most this many cells a side


def _without_specks(ink: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """The ink mask without the pieces that are specks: dust, a pencil dot or a fleck on the page, small
    next to the drawing but at full ink, would otherwise stretch the crop and shrink the digit to fit it
    (research/scan_fidelity.py). Pieces are the 8-connected groups of a coarse grid (so a stroke with a small
    gap stays one piece), weighed by their ink."""
    h, w = ink.shape
    c = -(-max(h, w) // SPECK_CELLS)
    ph, pw = -(-h // c), -(-w // c)
    cells = np.zeros((ph * c, pw * c), np.uint8)
    cells[:h, :w] = np.where(ink, gray, 0)
    mass = cells.reshape(ph, c, pw, c).sum((1, 3), dtype=np.int64)
    on = mass > 0
    if not on.any():
        return ink
    label = np.where(on, np.arange(on.size).reshape(on.shape), on.size)
    while True:  # each cell takes the smallest label around it until none changes
        padded = np.pad(label, 1, constant_values=on.size)
        rows = np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])  # 3x3 minimum, one axis at a time
        around = np.minimum(np.minimum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
        new = np.where(on, around, on.size)
        flat = new.ravel()
        flat[on.ravel()] = flat[flat[on.ravel()]]  # and the smallest label its label points to: fewer rounds
        if np.array_equal(new, label):
            break
        label = new
    weight = np.bincount(label[on], weights=mass[on])
    kept = np.zeros_like(on)
    kept[on] = weight[label[on]] >= SPECK_SHARE * weight.max()
    if np.array_equal(kept, on):
        return ink
    return ink & np.repeat(np.repeat(kept, c, 0), c, 1)[:h, :w]


def _thin_strokes_kept(gray: np.ndarray, size: tuple[int, int], top: int) -> np.ndarray:
    """A pen stroke much thinner than one output pixel (a 1-3 px line on a scanned page) is averaged
    into the background by the resize. Max-pool first, which keeps a stroke at full ink however thin,
    down to about twice the output size; resample that in floats; bring the strokes back to the
    original ink level; widen them to MNIST's (a bright core with a softer pixel either side)."""
    m = max(1, max(gray.shape) // (2 * max(size)))
    h, w = -(-gray.shape[0] // m) * m, -(-gray.shape[1] // m) * m
    pooled = np.pad(gray, ((0, h - gray.shape[0]), (0, w - gray.shape[1]))).reshape(h // m, m, w // m, m).max((1, 3))
    f = np.clip(np.asarray(Image.fromarray(pooled.astype(np.float32), "F").resize(size, Image.Resampling.LANCZOS)),
                0, None)
    ink = f[f > 0.25 * f.max()]
    if not ink.size:
        return f.astype(np.uint8)
    f *= top / np.percentile(ink, 90)  # crossings add up in the resample: not the maximum
    neighbours = np.asarray(Image.fromarray(f, "F").filter(ImageFilter.MaxFilter(3)))
    return np.clip(np.rint(np.maximum(f, 0.6 * neighbours)), 0, 255).astype(np.uint8)


def _should_invert(gray: np.ndarray, border: np.ndarray, mode: str) -> bool:
    """auto: the ink is darker than the paper, i.e. the background (the border's median grey) lies nearer
    the brightest pixel than the darkest. Unlike "the border is light", this also holds for a grey,
    under-exposed scan of a pencil digit, and for a white digit on grey."""
    if mode != "auto":
        return mode == "true"
    background = float(np.median(border))
    return float(gray.max()) - background < background - float(gray.min())
