"""Preprocessing of the images people really send: pinned pixel values, and properties for any input."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from app.exceptions import ServiceError
from app.imaging import Preprocess, file_to_gray28, file_to_tensor, is_small_gray, png_header
from app.preprocess import BOLD, THIN, recentred, stroke_width, thinned
from tests.conftest import TEST_DATA, bomb_png
from training import export

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
INK = np.asarray(Image.open(io.BytesIO(DIGIT)))  # white digit on black, uint8 28x28


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def prep(data: bytes, **kw) -> np.ndarray:
    return file_to_gray28(data, 10**8, Preprocess(**kw))


def aligned(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """`got` moved by at most a pixel each way to match `expected` best: the fit places a digit by its centre
    of mass in whole pixels, and a little noise or uneven ink can tip that past a half pixel."""
    moves = [np.roll(got.astype(int), (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return min(moves, key=lambda g: int(np.abs(g - expected).sum()))


def page_with_line(size: int, width: int, angle_free: bool = False) -> Image.Image:
    """A dark pen line on white paper, as a scanner or a phone sees a drawn "1"."""
    im = Image.new("L", (size, size), 255)
    ImageDraw.Draw(im).line([(size // 2, size // 8), (size // 2 - (size // 10 if angle_free else 0), size * 7 // 8)],
                            fill=0, width=width)
    return im


# --- transparency and bit depth: pixel values, not just status codes -------------------

def test_transparent_background_is_flattened_onto_white() -> None:
    """Black ink whose opacity is the digit, on a fully transparent (black, alpha 0) background: on
    white it is a dark digit on paper, so it comes out as the MNIST digit itself."""
    black = np.zeros((28, 28), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([black, black, black, INK]), "RGBA")
    la = Image.fromarray(np.dstack([black, INK]), "LA")
    expected = prep(encoded(Image.fromarray(255 - INK, "L")))  # the same digit drawn opaque on white paper
    assert np.abs(expected.astype(int) - INK).max() <= 1
    for img in (rgba, la):
        got = prep(encoded(img))
        assert np.abs(got.astype(int) - expected).max() <= 1, img.mode  # onto black it would be all black


@pytest.mark.parametrize("mode", ["P", "PA"])
def test_palette_transparency_is_flattened_onto_white(mode: str) -> None:
    from app.preprocess import _to_gray

    index = (INK > 127).astype(np.uint8)  # 0: the paper, 1: the ink
    im = Image.fromarray(index, "P")
    im.putpalette([0, 0, 0, 0, 0, 0])  # both black: only transparency tells the paper from the ink
    if mode == "P":
        im.info["transparency"] = 0
    else:
        im = Image.fromarray(np.dstack([index, index * 255]), "PA")
        im.putpalette([0, 0, 0, 0, 0, 0])
    assert im.mode == mode
    assert np.asarray(_to_gray(im)).tolist() == np.where(index == 1, 0, 255).tolist()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_colour_in_a_grey_or_colour_png_is_paper(mode: str) -> None:
    """PNG's tRNS chunk marks one grey level or colour transparent: a black page drawn with ink one level
    above it reads as a dark digit on white paper once composited, not as an all-black image."""
    from app.preprocess import _decode_pillow

    index = (INK > 127).astype(np.uint8)  # 0: transparent paper, 1: ink
    im = Image.fromarray(index, "L") if mode == "L" else Image.fromarray(np.dstack([index] * 3), "RGB")
    keyed = encoded(im, transparency=0 if mode == "L" else (0, 0, 0))
    assert np.asarray(_decode_pillow(keyed, 10**6)).tolist() == np.where(index == 1, 1, 255).tolist()
    assert np.asarray(_decode_pillow(encoded(im), 10**6)).max() == 1  # without the chunk: as they are


def test_undecodable_bytes_say_why() -> None:
    truncated = DIGIT[: len(DIGIT) // 2]
    with pytest.raises(ServiceError) as e:
        file_to_tensor(truncated + b"\0" * 10, 10**8, Preprocess(invert="false", fit=False))
    assert e.value.error == "cannot decode image" and str(e.value.detail).startswith(("OSError: ", "SyntaxError: "))


def test_16_bit_images_are_scaled_by_their_full_range() -> None:
    sixteen = Image.fromarray(INK.astype(np.uint16) * 257)  # the same grey levels, 0..65535
    assert sixteen.mode in ("I;16", "I")
    assert np.array_equal(prep(encoded(sixteen)), INK)


# --- thin pens, sideways photos, grey scans ---------------------------------------------

@pytest.mark.parametrize(("size", "width"), [(200, 1), (200, 2), (200, 3), (600, 1), (4000, 2)])
def test_thin_pen_strokes_keep_their_ink(size: int, width: int) -> None:
    out = prep(encoded(page_with_line(size, width)))
    assert out.max() >= 200  # a stroke at nearly full ink, not faded into the background
    cols = np.nonzero(out.max(axis=0) > 100)[0]
    rows = np.nonzero(out.max(axis=1) > 100)[0]
    assert 1 <= len(cols) <= 4 and len(rows) >= 18  # a tall thin "1", 20 px high as MNIST's
    assert 11 <= cols.mean() <= 16  # centred


@pytest.mark.parametrize("size", [400, 1000, 4000])
def test_a_thin_stroke_lands_where_the_same_stroke_drawn_thick_does(size: int) -> None:
    """The max-pooled path for thin pens and the plain path for thick ones place a drawing alike."""
    def seven(width: int) -> Image.Image:
        im = Image.new("L", (size, size), 255)
        corners = [(size * 3 // 10, size // 6), (size * 7 // 10, size // 6), (size * 9 // 20, size * 5 // 6)]
        ImageDraw.Draw(im).line(corners, fill=0, width=width, joint="curve")
        return im

    thin, thick = (prep(encoded(seven(w))) for w in (2, size // 16))

    def shape(g: np.ndarray) -> tuple[float, float, int, int, int, int]:
        ys, xs = np.nonzero(g > 60)
        return ys.mean(), xs.mean(), ys.min(), ys.max(), xs.min(), xs.max()

    a, b = shape(thin), shape(thick)
    assert abs(a[0] - b[0]) <= 1.5 and abs(a[1] - b[1]) <= 1.5  # centre of the ink
    assert all(abs(p - q) <= 2 for p, q in zip(a[2:], b[2:], strict=True))  # its extent
    assert thin.max() >= 200 and thick.max() >= 200


@pytest.mark.parametrize(("size", "pen"), [(300, 1), (4000, 3)])
def test_thin_pen_output_pixel_for_pixel(size: int, pen: int) -> None:
    """A "7" drawn with a thin pen on a page, as the service prepares it; the expected pictures were
    looked at (they are 7s with MNIST's stroke width). Pillow's resampling is part of what is pinned."""
    im = Image.new("L", (size, size), 255)
    corners = [(size * 3 // 10, size // 6), (size * 7 // 10, size // 6), (size * 9 // 20, size * 5 // 6)]
    ImageDraw.Draw(im).line(corners, fill=0, width=pen, joint="curve")
    expected = np.asarray(Image.open(TEST_DATA / f"expected_thin_seven_{size}px_pen{pen}.png"))
    assert np.array_equal(file_to_gray28(encoded(im), 16_000_000, Preprocess()), expected)


def test_thin_and_thick_versions_of_one_drawing_encode_alike(models_dir: Path) -> None:
    module, _ = export.load(models_dir / "deep-tiny.pt")
    pages = {"thin": page_with_line(400, 2, True), "thick": page_with_line(400, 24, True),
             "blank": Image.new("L", (400, 400), 255)}
    mu = {k: module.encode(file_to_tensor(encoded(p), 10**8, Preprocess())[None])[0][0] for k, p in pages.items()}
    assert torch.dist(mu["thin"], mu["thick"]) < torch.dist(mu["thin"], mu["blank"])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    upright = page_with_line(300, 12)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored as the sensor saw it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    got = prep(encoded(sideways, fmt, exif=exif.tobytes()))
    expected = prep(encoded(upright, fmt))
    rows, cols = np.nonzero(got > 100)
    assert np.ptp(rows) > 3 * np.ptp(cols)  # standing up, not lying down
    if fmt == "PNG":
        assert np.array_equal(got, expected)
    else:
        assert np.abs(aligned(got, expected) - expected).max() <= 40


def test_exif_orientation_is_applied_to_a_28x28_grey_png_too() -> None:
    """The fast libpng path for MNIST-sized PNGs turns them as the Pillow path turns everything else."""
    upright = np.zeros((28, 28), np.uint8)
    upright[4:24, 12:15] = 255  # a "1"
    upright[4:7, 9:12] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encoded(Image.fromarray(upright, "L").transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    assert is_small_gray(png_header(sideways))
    assert np.array_equal(prep(sideways, fit=False), upright)


def test_a_grey_underexposed_scan_of_a_dark_digit_is_inverted() -> None:
    """The paper is darker than mid-grey, the pencil darker still: still a dark digit on paper."""
    scan = (110 - INK.astype(np.float32) * 100 / 255).astype(np.uint8)  # paper 110, ink down to 10
    assert np.abs(prep(encoded(Image.fromarray(scan, "L"))).astype(int) - INK).max() <= 3


def test_a_white_digit_on_grey_is_not_inverted() -> None:
    board = (150 + INK.astype(np.float32) * 105 / 255).astype(np.uint8)  # grey board 150, chalk up to 255
    assert np.abs(prep(encoded(Image.fromarray(board, "L"))).astype(int) - INK).max() <= 3


# --- any input: properties ---------------------------------------------------------------

MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "CMYK"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]


@st.composite
def drawings(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A stroke of any width on a page of any size and aspect ratio, any mode and format; and whether
    it must show up (it stays off the border and contrasts with the paper)."""
    w, h = draw(st.integers(1, 700)), draw(st.integers(1, 700))
    paper = draw(st.sampled_from([0, 30, 200, 255]))
    ink = 255 - paper if paper in (0, 255) else (230 if paper < 128 else 20)
    stroke = draw(st.integers(1, 40))
    im = Image.new("L", (w, h), paper)
    margin = stroke + 2
    visible = w > 2 * margin + 1 and h > 2 * margin + 1
    if visible:
        p1 = (draw(st.integers(margin, w - margin - 1)), draw(st.integers(margin, h - margin - 1)))
        p2 = (draw(st.integers(margin, w - margin - 1)), draw(st.integers(margin, h - margin - 1)))
        ImageDraw.Draw(im).line([p1, p2], fill=ink, width=stroke)
        visible = np.asarray(im).max() != np.asarray(im).min() and min(w, h) >= 4
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)
        fmt = "PNG" if fmt not in ("PNG", "TIFF") else fmt
    else:
        im = im.convert(mode)
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    if fmt in ("GIF", "BMP", "WEBP") and im.mode in ("CMYK", "LA"):
        im = im.convert("RGBA" if fmt == "WEBP" else "RGB")
    # Lossy formats with a 1-px stroke on a tiny page can blur the ink into the paper: no promise there.
    lossy = fmt in ("JPEG", "WEBP") or mode == "1"
    return encoded(im, fmt), visible and not (lossy and stroke < 3)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawings(), st.sampled_from(["auto", "true", "false"]))
def test_any_image_becomes_28x28_in_0_1_and_ink_stays(case: tuple[bytes, bool], invert: str) -> None:
    data, visible = case
    try:
        x = file_to_tensor(data, 16_000_000, Preprocess(invert=invert))  # type: ignore[arg-type]
    except ServiceError as e:  # only the documented refusals (undecodable, too large, empty, ...)
        pytest.fail(f"a valid image was refused: {e.error}: {e.detail}")
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    if visible and invert == "auto":
        assert float(x.max()) > 0.3, "the stroke vanished"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_documented_errors(data: bytes) -> None:
    try:
        x = file_to_tensor(data, 16_000_000, Preprocess())
    except ServiceError:
        return
    assert x.shape == (1, 28, 28)


# --- pinned steps -------------------------------------------------------------------------

def test_photo_preparation_pixel_for_pixel() -> None:
    """The photographed 4: inverted, levelled, cropped, fitted into 20x20 and centred (looked at: a 4)."""
    photo = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()
    expected = np.asarray(Image.open(TEST_DATA / "expected_photo_digit_4.png"))
    assert np.array_equal(prep(photo), expected)


def test_fit_crops_to_the_ink_and_puts_its_centre_of_mass_where_mnist_has_it() -> None:
    """A "7": a bar along the top and a stem down the right. Its mass sits up and right of the middle of
    its box, so MNIST's centring (centre of mass at (14, 14)) places it down and left of where centring the
    box would (rows 4-23, columns 4-23)."""
    im = np.zeros((40, 50), dtype=np.uint8)
    im[5:9, 10:30] = 200  # the bar: 4 x 20
    im[9:25, 26:30] = 200  # the stem: 16 x 4; the whole ink 20 x 20, off centre
    out = prep(encoded(Image.fromarray(im, "L")), thin=False)  # the fit alone: 4 px strokes are bold
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 27, 1, 20)
    assert out[8:12, 1:21].min() == out[12:28, 17:21].min() == 255 and out.sum() == 255 * (80 + 64)  # MNIST's ink
    mass = out.astype(float) / out.sum()
    assert abs((mass.sum(1) * np.arange(28)).sum() - 14) <= 0.5 and abs((mass.sum(0) * np.arange(28)).sum() - 14) <= 0.5


def test_background_levelling_maps_paper_to_black_and_the_brightest_ink_to_white() -> None:
    from app.preprocess import _level_background

    gray = np.array([[100, 100, 100], [100, 50, 160], [100, 100, 220]], dtype=np.uint8)
    border = np.full(8, 100, dtype=np.uint8)
    assert _level_background(gray, border).tolist() == [[0, 0, 0], [0, 0, 127], [0, 0, 255]]
    assert _level_background(gray, np.zeros(8, dtype=np.uint8)) is gray  # black paper: untouched


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I;16", [0, 257, 65535], [0, 1, 255]),
    ("I;16B", [0, 257 * 128, 65535], [0, 128, 255]),
    ("I;16L", [0, 257 * 200, 65535], [0, 200, 255]),
    ("I", [0, 128, 255], [0, 128, 255]),  # 32-bit integers that fit in 8 bits: as they are
    ("I", [0, 257 * 128, 65535], [0, 128, 255]),  # and 16-bit values stored as 32-bit ones
    ("I;16", [0, 100, 200], [0, 0, 1]),  # a dark 16-bit image is still 16-bit
    ("I", [0, 256], [0, 1]),  # above 255: 16-bit values
    ("I", [-5, 255], [0, 255]),
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # floats in [0, 1] ...
    ("F", [0.0, 1.5], [0, 2]),  # ... or in [0, 255]
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),
    ("F", [-0.5, 0.5, 1.0], [0, 128, 255]),
    ("F", [0.0, 0.75, 1.0], [0, 191, 255]),  # 0.75 * 255 = 191.25: scaled by 255, not 256
    ("F", [0.0, 1000.0], [0, 255]),  # past white: clipped, never wrapped round to black
    ("I", [0, 65535, 200000], [0, 255, 255]),  # 32-bit values past 16 bits: clipped too
])
def test_deep_and_float_images_are_scaled_to_8_bits(mode: str, values: list, expected: list[int]) -> None:
    from app.preprocess import _to_gray

    if mode.startswith("I;16"):
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I;16L": "<u2"}[mode]
        im = Image.frombytes(mode, (3, 1), np.array(values, dtype=dtype).tobytes())
    else:
        im = Image.fromarray(np.array([values], dtype=np.int32 if mode == "I" else np.float32), mode)
    assert im.mode == mode
    assert np.asarray(_to_gray(im)).tolist() == [expected]


def test_small_grey_pngs_skip_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 28x28 8-bit grey PNG (what MNIST tooling sends) is decoded by libpng from its header alone;
    Pillow, ten times slower for it, is never called (the serving benchmark depends on it)."""
    import app.preprocess as preprocess
    from app.inputs import ImageReader

    def no_pillow(data: bytes, max_pixels: int) -> np.ndarray:
        raise AssertionError("Pillow decoded a small grey PNG")

    expected = file_to_gray28(DIGIT, 10**6, Preprocess())
    monkeypatch.setattr(preprocess, "_decode_pillow", no_pillow)
    assert np.array_equal(file_to_gray28(DIGIT, 10**6, Preprocess()), expected)
    reader = ImageReader(10**6, timeout_s=5)
    try:
        x = asyncio.run(reader([DIGIT, DIGIT], Preprocess()))
    finally:
        reader.close()
    assert x.shape == (2, 1, 28, 28) and np.array_equal((x[0, 0].numpy() * 255).round(), expected)


def test_paper_one_grey_level_above_black_is_still_levelled() -> None:
    from app.preprocess import _level_background

    gray = np.array([[1, 1, 1], [1, 128, 255], [1, 1, 1]], dtype=np.uint8)
    assert _level_background(gray, np.ones(8, dtype=np.uint8)).tolist() == [[0, 0, 0], [0, 127, 255], [0, 0, 0]]


@pytest.mark.parametrize(("shape", "box"), [((100, 1), (4, 23, 14, 14)), ((1, 100), (14, 14, 4, 23)),
                                            ((13, 20), (8, 20, 4, 23))])
def test_fit_keeps_one_pixel_lines_one_pixel_and_centres_odd_sizes(shape: tuple[int, int], box: tuple) -> None:
    """A 1 px line stays 1 px wide (not stretched to 2), on row or column 14 where MNIST's centre of mass
    is; an odd height's middle row lands there too, an even length's middle (a half pixel) just before it."""
    im = np.zeros((shape[0] + 20, shape[1] + 20), dtype=np.uint8)
    im[10 : 10 + shape[0], 10 : 10 + shape[1]] = 255
    out = file_to_gray28(encoded(Image.fromarray(im, "L")), 10**6, Preprocess(invert="false", thin=False))
    ys, xs = np.nonzero(out)
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == box


def test_strokes_faded_below_half_ink_by_the_resize_are_restored() -> None:
    """A 4 px pen on a 200 px page fades to ~40% of its ink at 20 px: below half, so the strokes are
    pooled first and come back at full ink."""
    im = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(im).rectangle((0, 0, 199, 199), outline=0, width=4)
    out = file_to_gray28(encoded(im), 10**6, Preprocess())
    assert out.max() >= 240


@pytest.mark.parametrize(("pen", "faded_to"), [(4, 87), (5, 124)])
def test_strokes_faded_to_between_a_third_and_a_half_are_restored(pen: int, faded_to: int) -> None:
    """Two straight pen strokes (no crossings to add up) on a 200 px page: the plain resize leaves them
    at `faded_to` of 255, under half the ink, so they take the pooled path and come back at full ink."""
    im = Image.new("L", (200, 200), 255)
    for x in (40, 150):
        ImageDraw.Draw(im).rectangle((x, 0, x + pen - 1, 199), fill=0)
    ink = 255 - np.asarray(im)[:, 40:150 + pen]
    size = (round(ink.shape[1] * 20 / 200), 20)
    assert np.asarray(Image.fromarray(ink, "L").resize(size, Image.Resampling.LANCZOS)).max() == faded_to
    assert file_to_gray28(encoded(im), 10**6, Preprocess()).max() == 255


def test_ink_exactly_as_far_from_the_paper_as_the_paper_from_black_is_not_inverted() -> None:
    from app.preprocess import _should_invert

    gray = np.array([[128, 128, 128], [128, 255, 1], [128, 128, 128]], dtype=np.uint8)
    border = np.full(8, 128, dtype=np.uint8)
    assert not _should_invert(gray, border, "auto")  # 255 - 128 == 128 - 1: a tie keeps the image as sent
    assert _should_invert(gray.clip(0, 250), border, "auto")


def test_fit_false_says_the_size_it_got() -> None:
    from app.exceptions import WrongImageSize

    wide = encoded(Image.new("L", (40, 30), 0))
    with pytest.raises(WrongImageSize) as e:
        file_to_gray28(wide, 10**6, Preprocess(fit=False))
    assert e.value.detail == "image is 40x30; with fit=false it must be 28x28"


# --- the PNG header, read before any decoding ---------------------------------------------------

def png_head(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """Signature and IHDR chunk: the 33 bytes png_header reads."""
    return bomb_png(width, height, depth, colour)[:33]


def test_the_png_header_is_read_from_exactly_its_33_bytes() -> None:
    head = png_head(28, 28)
    assert len(head) == 33 and png_header(head) == (28, 28, 8, 0)
    assert png_header(head[:32]) is None
    assert png_header(png_head(3_000_000_000, 2, 16, 6)) == (3_000_000_000, 2, 16, 6)  # unsigned, past 2^31
    assert png_header(b"GIF89a\0\0" + head[8:]) is None  # an IHDR where a PNG has one is not enough
    assert png_header(head[:12] + b"IDAT" + head[16:]) is None


def test_the_pixel_limit_counts_width_times_height_before_decoding() -> None:
    wide = bomb_png(300, 100)  # its IDAT holds 1000 zero bytes, far from the 30,000 pixels it claims
    with pytest.raises(ServiceError) as refused:
        file_to_gray28(wide, 20_000, Preprocess())
    assert (refused.value.error, refused.value.detail) == (
        "image too large", "300x100 pixels; the limit is 20000 pixels (VAE_MAX_IMAGE_PIXELS)")


def test_an_empty_upload_is_told_so() -> None:
    with pytest.raises(ServiceError) as refused:
        file_to_gray28(b"", 10**6, Preprocess())
    assert (refused.value.error, refused.value.detail) == ("empty image", "the request carried no image bytes")


def test_faint_ink_and_specks_do_not_widen_the_box_but_a_dot_does() -> None:
    """The box is the ink above a fifth of the brightest, less pieces under 5% of the largest piece's ink:
    dust, not the dot of a "?" or an "i" (10-20%)."""
    def fitted(page: np.ndarray) -> np.ndarray:
        return file_to_gray28(encoded(Image.fromarray(page)), 10**6, Preprocess(invert="false"))

    page = np.zeros((100, 100), np.uint8)
    page[30:70, 45:55] = 255  # the drawing: 400 px of full ink
    alone = fitted(page)
    page[5:25, 5:25] = 51  # a large faint patch, exactly 0.2 of the ink: not ink
    assert np.array_equal(fitted(page), alone)
    page[5:25, 5:25] = 0
    page[5:9, 5:9] = 255  # a speck: 16 px, 4% of the drawing
    assert np.array_equal(fitted(page), alone)
    page[5:10, 5:9] = 255  # a dot: 20 px, 5%
    ys, xs = np.nonzero(fitted(page))
    assert ys.min() <= 1 and xs.min() <= 5  # the box now runs from the dot to the drawing


def test_without_a_working_torchvision_pillow_decodes_and_encodes_the_same_pixels(monkeypatch) -> None:
    """A torchvision that cannot load (a CUDA build under a CPU-only torch raises on import) must not take the
    service down: a copy of app/imaging.py imported with torchvision.io unavailable falls back to Pillow."""
    import importlib.util
    import sys

    import app.imaging as with_tv

    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # import of it raises ImportError
    spec = importlib.util.spec_from_file_location("imaging_without_torchvision", with_tv.__file__)
    assert spec is not None and spec.loader is not None
    without_tv = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, without_tv)  # dataclasses look their module up
    spec.loader.exec_module(without_tv)
    assert without_tv.encode_png is None and not without_tv.is_small_gray(png_header(DIGIT))
    assert with_tv.is_small_gray(png_header(DIGIT))  # the fast path is the one being replaced
    np.testing.assert_array_equal(without_tv.file_to_gray28(DIGIT, 10**8, without_tv.Preprocess()), prep(DIGIT))
    batch = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for images in (batch[:1], batch):
        by_pillow, by_libpng = without_tv.to_png(images), with_tv.to_png(images)
        assert by_pillow.startswith(b"\x89PNG")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(by_pillow))),
                                      np.asarray(Image.open(io.BytesIO(by_libpng))))


def paper_lit(size: int, light: np.ndarray, ink: np.ndarray) -> bytes:
    """A page whose paper is `light` (per pixel) with dark ink where `ink` is 1, as a phone photographs it."""
    return encoded(Image.fromarray((light * (1 - 0.85 * ink)).clip(0, 255).astype(np.uint8), "L"))


@pytest.mark.parametrize("light", ["gradient", "vignette"])
def test_unevenly_lit_paper_gives_the_digit_the_evenly_lit_page_gives(light: str) -> None:
    """Light falling off across the page (from 250 to 150) or into its corners (to 130): one grey for the
    paper left the darker parts as faint ink, which widened the crop and shrank the digit."""
    size = 400
    ink = np.asarray(page_with_line(size, 24, True), np.float64) < 128
    yy, xx = np.mgrid[0:size, 0:size] / size
    lit = 250 - 100 * xx if light == "gradient" else 250 - 240 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    even = prep(paper_lit(size, np.full((size, size), 250.0), ink))
    got = aligned(prep(paper_lit(size, lit, ink)), even)
    assert np.abs(got - even).max() <= 40 and np.abs(got - even).mean() < 2


def test_a_thick_digit_that_fills_the_photo_keeps_its_ink() -> None:
    """The paper's light is fitted as a smooth surface, so a stroke a sixth of the photo wide is not taken
    for paper (a per-window estimate hollowed such strokes)."""
    size = 300
    ink = np.zeros((size, size))
    ink[20:280, 125:175] = 1  # a "1" drawn with a marker, 50 px wide
    xx = np.mgrid[0:size, 0:size][1] / size
    got = prep(paper_lit(size, 200 + 40 * xx, ink), thin=False)  # the levelling alone: a marker is bold
    core = got[6:22, 12:16]  # the middle of the stroke, 28x28 coordinates
    assert core.min() >= 200
    thinned_core = prep(paper_lit(size, 200 + 40 * xx, ink))[6:22, 13:15]  # thinned, the stroke's middle stays
    assert thinned_core.min() >= 200


def test_soft_strokes_get_mnist_s_flat_topped_ink() -> None:
    """A blurred photo of a thick stroke peaks in a few pixels once shrunk; MNIST's strokes are flat-topped,
    half their ink (pixels above half the brightest) at 250-255. The fit brings the first to the second."""
    im = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(im).line([(150, 30), (120, 270)], fill=60, width=30)
    out = prep(encoded(im.filter(ImageFilter.GaussianBlur(12))))
    ink = out[out > out.max() // 2]
    assert out.max() == 255 and np.mean(ink >= 250) >= 0.45  # MNIST's test digits: 0.50 on average


# --- 28x28 inputs where MNIST's are, bold strokes thinned (issue 36) --------------------

def moved(digit: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.roll(digit, (dy, dx), axis=(0, 1))
    before, after = np.argwhere(digit), np.argwhere(out)
    assert np.array_equal(after.min(0) - before.min(0), [dy, dx])  # within the margin: no ink wraps
    return out


@pytest.mark.parametrize(("dy", "dx"), [(-3, 3), (-7, 0), (0, 6), (1, -4), (-4, -6)])  # the 7: rows 7-26, columns 6-21
def test_a_28x28_digit_off_centre_is_moved_where_mnist_has_it(dy: int, dx: int) -> None:
    png = encoded(Image.fromarray(moved(INK, dy, dx)))
    assert np.array_equal(prep(png), INK)
    assert np.array_equal(prep(png, fit=False), moved(INK, dy, dx))  # fit=false: where it is, as it is


def test_every_mnist_test_digit_stays_where_it_is(mnist) -> None:
    digits = mnist.test_images.numpy()
    assert all(np.array_equal(recentred(d), d) for d in digits)
    changed = sum(not np.array_equal(thinned(d), d) for d in digits)
    assert 250 < changed < 350  # the boldest 3% of MNIST's own digits (widths above BOLD)


def test_stroke_width_is_the_width_of_a_bar() -> None:
    bar = np.zeros((28, 28), np.uint8)
    bar[4:24, 10:12] = 255  # 2 wide, 20 long: area 40, outline 2 x 20 + 2 x 2
    assert stroke_width(bar) == 80 / 44
    bar[4:24, 10:15] = 200
    assert stroke_width(bar) == 200 / 50
    assert stroke_width(np.zeros((28, 28), np.uint8)) == 0.0
    edge = np.zeros((28, 28), np.uint8)
    edge[:, :3] = 255  # ink at the edge has an outline there too
    assert stroke_width(edge) == 2 * 84 / (2 * 28 + 2 * 3)


def test_bold_strokes_are_thinned_to_an_ordinary_width_and_others_are_not() -> None:
    padded = np.pad(INK, 1)
    bold = np.max([padded[i : i + 28, j : j + 28] for i in range(3) for j in range(3)], axis=0)
    assert stroke_width(bold) > BOLD and stroke_width(INK) <= BOLD
    got = prep(encoded(Image.fromarray(bold)))
    assert abs(stroke_width(got) - THIN) < 0.5
    assert np.abs(got.astype(int) - INK).mean() < 0.6 * np.abs(bold.astype(int) - INK).mean()  # back towards it
    page = Image.fromarray(bold).resize((280, 280), Image.Resampling.BILINEAR)
    assert stroke_width(prep(encoded(page))) <= BOLD  # a page's bold digit too
    assert np.array_equal(prep(DIGIT), INK)


def test_a_loop_turns_files_screened_together_equal_each_one_alone(mnist) -> None:
    """`fast_gray28_many` (one loop turn's fast PNGs, screened by `preprocess.unchanged`) answers exactly what
    `fast_gray28` answers file by file: MNIST's test digits (all unchanged), and the same digits shifted,
    drawn bold, on a grey border, one a ridge of exact ties, under every preprocessing option set; a
    broken file fails alone."""
    from app.imaging import fast_gray28, fast_gray28_many, is_fast_png

    digits = mnist.test_images[:2000].numpy().astype(np.uint8).reshape(-1, 28, 28)
    variants = [np.roll(digits[:200], 3, axis=2), np.roll(digits[200:400], -4, axis=1),
                np.asarray([np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(3))) for d in digits[400:600]]),
                np.where(digits[600:700] == 0, 40, digits[600:700]).astype(np.uint8)]
    ridge = np.zeros((28, 28), np.uint8)
    ridge[5:23, 13:15] = 255  # centre of mass exactly half a pixel off in x: round half to even
    images = [*digits, *np.concatenate(variants), ridge, np.zeros((28, 28), np.uint8)]

    def png(a: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(a, "L").save(out, "PNG")
        return out.getvalue()

    blobs = [png(a) for a in images] + [png(images[0])[:40]]  # the last one cut short
    assert all(is_fast_png(b, png_header(b)) for b in blobs[:-1])
    for prep in (Preprocess(), Preprocess(fit=False), Preprocess(thin=False), Preprocess(invert="true"),
                 Preprocess(invert="false")):
        together = fast_gray28_many([(b, png_header(b), prep) for b in blobs], 16_000_000)
        for blob, got in zip(blobs, together, strict=True):
            try:
                alone = fast_gray28(blob, png_header(blob), 16_000_000, prep)
            except Exception as e:
                assert type(got) is type(e) and str(got) == str(e)
                continue
            assert isinstance(got, np.ndarray) and np.array_equal(got, alone), prep
    assert isinstance(fast_gray28_many([(blobs[-1], png_header(blobs[-1]), Preprocess())], 784)[0], Exception)
