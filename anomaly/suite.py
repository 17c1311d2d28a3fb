"""Out-of-distribution sets for the anomaly score: what people send that is not one MNIST digit.

Deterministic for a seed, and cached (`build_sets` writes one .npz), so every method and
model is compared on the same images. Near-OOD sets are drawn the way MNIST was made:
ink fitted into 20x20 keeping the aspect ratio (antialiased), then placed in 28x28 with
its centre of mass at the centre (`mnist_style`).

Glyphs come from fonts that Debian packages carry (fonts-dejavu-core, fonts-liberation,
fonts-freefont-ttf, fonts-urw-base35, fonts-noto-core); fonts that are not installed are
skipped, and a set needs at least one. Characters that are, or look like, digits are never
drawn as non-digits: no I, l, O, o, S, Z, B, G, b, g, q, /, |, brackets, theta (a barred 0),
Hebrew dalet and resh (7s), Georgian vani, bani, gani (3, 6, 8), and so on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from app.preprocess import Preprocess, centred_by_mass, gray28

CACHE_VERSION = 5  # 4: the labels; 5: ordinary variations of held-out digits
# the sets of non-digits drawn with a pen: the ones the near-OOD targets are about
PEN_STROKES = ("letters-upper", "letters-lower", "greek-cyrillic", "symbols", "other-scripts", "scribbles", "doodles")
CANVAS = 160  # glyphs and doodles are drawn this large, then fitted like MNIST

FONT_DIRS = [Path("/usr/share/fonts")]
FONT_FILES = [  # regular, bold, italic and script faces of several families: many ways to draw a shape
    "truetype/dejavu/DejaVuSans.ttf", "truetype/dejavu/DejaVuSans-Bold.ttf", "truetype/dejavu/DejaVuSerif.ttf",
    "truetype/dejavu/DejaVuSansMono.ttf", "truetype/dejavu/DejaVuSans-Oblique.ttf",
    "truetype/liberation/LiberationSans-Regular.ttf", "truetype/liberation/LiberationSerif-Italic.ttf",
    "truetype/liberation/LiberationMono-Bold.ttf",
    "truetype/freefont/FreeSans.ttf", "truetype/freefont/FreeSerifItalic.ttf", "truetype/freefont/FreeMono.ttf",
    "opentype/urw-base35/Z003-MediumItalic.otf", "opentype/urw-base35/URWGothic-Book.otf",
    "opentype/urw-base35/URWBookman-Light.otf", "opentype/urw-base35/C059-Italic.otf",
    "opentype/urw-base35/NimbusSans-Bold.otf", "opentype/urw-base35/P052-Roman.otf",
    "truetype/noto/NotoSans-Regular.ttf", "truetype/noto/NotoSerif-Regular.ttf",
]
# Other alphabets, each in a font that has it. Left out, after looking at every glyph drawn the way the
# set draws it, those a reader would take for a digit (the rule that leaves S, Z, B, G, b, g, q, I, l,
# O, o out of the Latin letters): Armenian Գ (a 9) and Կ (a 4), Thai ร (an S, so a 5) and อ (an o),
# Georgian ზ (an 8), ნ and წ (6s), პ and ჰ (3s), ხ (a b).
SCRIPT_FONTS = {
    "truetype/noto/NotoSansHebrew-Regular.ttf": "אבגהחכמנצקשת",
    "truetype/noto/NotoSansDevanagari-Regular.ttf": "कखगघचजटडतथपबमयरलशह",
    "truetype/noto/NotoSansArmenian-Regular.ttf": "ԱԲԴԵԺԽԾՃՄՆՇՊՋՌՍՎՐՓՔ",
    "truetype/noto/NotoSansThai-Regular.ttf": "กขคงจฉชซญฎฐณดตถทนบปผพฟภมยลวศสหฮ",
    "truetype/noto/NotoSansGeorgian-Regular.ttf": "ადეთიკლმოჟრსტუფქღყშჩცძჭჯ",
}
# Letters that do not look like a digit in common handwriting or type.
UPPER = "ACEFHJKLMNPRTUVWXY"
LOWER = "acdefhkmnprtuvwxy"
GREEK_CYRILLIC = "αγεζηλμνξπσφψωΓΔΛΞΠΣΦΨΩЖФДЛИШЩЫЮЯжфдлишщюя"
SYMBOLS = "+×÷=≠?#%&@*<>~^€£±√∞≈→←↑↓♥★✓✗☺♪πµΩ∂∑¶¤©®"
DIGITS = "0123456789"


@dataclass
class OodSet:
    images: np.ndarray  # uint8 [N, 28, 28], white ink on black
    about: str
    kind: str  # "far", "near", "transformed" (MNIST moved out of shape), "digits" (in-distribution, unseen style)
    #            or "variation" (held-out MNIST digits written differently: not anomalies either)
    labels: np.ndarray | None = None  # str [N]: what each image is where the set draws it (a character, a shape)


# --- drawing like MNIST -----------------------------------------------------------------

def mnist_style(ink: np.ndarray) -> np.ndarray:
    """Any-size white-on-black uint8 image -> 28x28 the way MNIST was made (fit 20x20, centre of mass)."""
    ys, xs = np.nonzero(ink)
    if not len(xs):
        return np.zeros((28, 28), np.uint8)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop, "L").resize(size, Image.Resampling.LANCZOS)).astype(np.float32)
    return np.clip(np.rint(centred_by_mass(small)), 0, 255).astype(np.uint8)


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small rotation and shear, as a hand or a slanted font would give."""
    angle = float(rng.uniform(-12, 12))
    shear = float(rng.uniform(-0.25, 0.25))
    img = img.transform(img.size, Image.Transform.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR)
    return img.rotate(angle, resample=Image.Resampling.BILINEAR)


def available_fonts(files: list[str] = FONT_FILES) -> list[Path | None]:
    """The listed fonts that are installed; [None] (Pillow's built-in font) where none is."""
    found: list[Path | None] = [d / f for f in files for d in FONT_DIRS if (d / f).is_file()]
    return found or [None]


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    if path is None:
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    return ImageFont.truetype(str(path), size)


def _has_glyph(font: ImageFont.FreeTypeFont, ch: str) -> bool:
    """False for characters the font draws as its 'missing' box (.notdef) or as nothing."""
    mask = font.getmask(ch)
    if mask.getbbox() is None:
        return False
    missing = font.getmask("\U000f0000")  # a private-use code point no font here has
    return not (mask.size == missing.size and bytes(mask) == bytes(missing))


def render_glyphs(chars: str, fonts: list[Path | None], n: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images of characters drawn in the given fonts, each with a random weight, slant and rotation, and
    which character each is: a set's misses are often a few characters drawn many times (research/ood_tail.py)."""
    loaded = [_font(f, 96) for f in fonts]
    pairs = [(font, ch) for font in loaded for ch in chars if _has_glyph(font, ch)]
    if not pairs:
        raise ValueError(f"none of {chars[:10]!r}... can be drawn with the fonts found")
    out, labels = np.zeros((n, 28, 28), np.uint8), np.empty(n, dtype="<U1")
    for i in range(n):
        font, ch = pairs[int(rng.integers(len(pairs)))]
        labels[i] = ch
        img = Image.new("L", (CANVAS, CANVAS))
        stroke = int(rng.integers(0, 4))  # a heavier pen
        ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), ch, fill=255, font=font, anchor="mm",
                                 stroke_width=stroke, stroke_fill=255)
        out[i] = mnist_style(np.asarray(_jitter(img, rng)))
    return out, labels


# --- pen strokes and doodles ------------------------------------------------------------

def _pen(rng: np.random.Generator) -> int:
    return int(rng.integers(12, 24))  # MNIST strokes are ~2-3 of 20 px: 10-20% of the ink's size


def _smooth_path(points: np.ndarray, steps: int = 16) -> list[tuple[float, float]]:
    """Catmull-Rom spline through the points: a hand's curve rather than a polygon."""
    p = np.vstack([points[0], points, points[-1]])
    path = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, steps, endpoint=False):
            t2, t3 = t * t, t * t * t
            path.append(tuple(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                                     + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)))
    path.append(tuple(p[-2]))
    return path


def _stroke(draw: ImageDraw.ImageDraw, path: list[tuple[float, float]], width: int) -> None:
    draw.line(path, fill=255, width=width, joint="curve")
    r = width / 2
    for x, y in (path[0], path[-1]):  # round pen ends
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)


def random_strokes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Scribbles: one to three smooth random strokes of 3-7 points each."""
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        img = Image.new("L", (CANVAS, CANVAS))
        draw, width = ImageDraw.Draw(img), _pen(rng)
        for _ in range(int(rng.integers(1, 4))):
            pts = rng.uniform(20, CANVAS - 20, size=(int(rng.integers(3, 8)), 2))
            _stroke(draw, _smooth_path(pts), width)
        out[i] = mnist_style(np.asarray(img))
    return out


def _polygon(k: int, rng: np.random.Generator, star: bool = False) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, (2 * k if star else k), endpoint=False) + rng.uniform(0, 2 * np.pi)
    radius = np.where(np.arange(len(angles)) % 2, 0.4, 1.0) if star else np.ones(len(angles))
    pts = np.stack([np.cos(angles) * radius, np.sin(angles) * radius], 1) * 60 + CANVAS / 2
    return np.vstack([pts, pts[:1]])


def _doodle(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Point lists (one per stroke) for a shape people draw that is no digit; circles and ovals are
    left out, they are zeros."""
    c = CANVAS / 2
    if kind == "triangle":
        return [_polygon(3, rng)]
    if kind == "square":
        return [_polygon(4, rng)]
    if kind == "pentagon":
        return [_polygon(5, rng)]
    if kind == "star":
        return [_polygon(5, rng, star=True)]
    if kind == "cross":  # an x or a plus, a "no" or a checkbox tick's opposite
        a = rng.uniform(0, np.pi / 2)
        d = np.array([np.cos(a), np.sin(a)]) * 60
        e = np.array([-d[1], d[0]])
        return [np.array([c - d, c + d]), np.array([c - e, c + e])]
    if kind == "check":
        return [np.array([[c - 50, c], [c - 15, c + 40], [c + 55, c - 50]])]
    if kind == "arrow":
        return [np.array([[c - 60, c], [c + 55, c]]), np.array([[c + 20, c - 35], [c + 55, c], [c + 20, c + 35]])]
    if kind == "zigzag":
        xs = np.linspace(c - 60, c + 60, int(rng.integers(4, 7)))
        return [np.stack([xs, c + np.where(np.arange(len(xs)) % 2, 30, -30)], 1)]
    if kind == "spiral":
        t = np.linspace(0, rng.uniform(3, 5) * np.pi, 40)
        r = 6 + 55 * t / t[-1]
        return [np.stack([c + r * np.cos(t), c + r * np.sin(t)], 1)]
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 40)
        return [np.stack([c + 4 * 16 * np.sin(t) ** 3,
                          c - 4 * (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)]
    if kind == "house":
        return [np.array([[c - 45, c + 55], [c - 45, c - 5], [c, c - 55], [c + 45, c - 5], [c + 45, c + 55],
                          [c - 45, c + 55]])]
    if kind == "wave":
        t = np.linspace(-1, 1, 30)
        return [np.stack([c + 60 * t, c + 25 * np.sin(t * np.pi * rng.uniform(1.5, 3))], 1)]
    if kind == "hash":
        return [np.array([[c - 20, c - 60], [c - 30, c + 60]]), np.array([[c + 25, c - 60], [c + 15, c + 60]]),
                np.array([[c - 60, c - 20], [c + 60, c - 20]]), np.array([[c - 60, c + 22], [c + 60, c + 22]])]
    raise ValueError(kind)


DOODLES = ("triangle", "square", "pentagon", "star", "cross", "check", "arrow", "zigzag", "spiral", "heart",
           "house", "wave", "hash")


def doodles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Hand-drawn shapes: every vertex jittered, smooth strokes, a random pen and slant; image i is a
    DOODLES[i % len(DOODLES)] (`doodle_kinds`)."""
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        img = Image.new("L", (CANVAS, CANVAS))
        draw, width = ImageDraw.Draw(img), _pen(rng)
        for pts in _doodle(DOODLES[i % len(DOODLES)], rng):
            pts = pts + rng.normal(0, 4, pts.shape)
            path = _smooth_path(pts, 6) if len(pts) > 8 else [tuple(p) for p in pts]
            _stroke(draw, path, width)
        out[i] = mnist_style(np.asarray(_jitter(img, rng)))
    return out


def doodle_kinds(n: int) -> np.ndarray:
    return np.array([DOODLES[i % len(DOODLES)] for i in range(n)])


def digit_pairs(mnist: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Two MNIST digits side by side, fitted into one box: a number, not one digit."""
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        a, b = mnist[rng.integers(len(mnist), size=2)]
        out[i] = mnist_style(np.concatenate([a, b], axis=1))
    return out


# --- ordinary variation of handwriting ---------------------------------------------------

PAGE = 280  # the variations "on a page" are drawn at 10x and go through the service's preprocessing


def shifted(digits: np.ndarray, rng: np.random.Generator, most: int = 4) -> np.ndarray:
    """Each digit moved by up to `most` px each way (never by nothing), as far as its margin allows: a
    digit cut out of a page by hand, or a canvas scaled down without centring, is not centred by mass."""
    out = np.zeros_like(digits)
    for i, d in enumerate(digits):
        ys, xs = np.nonzero(d)
        while True:
            dy, dx = (int(v) for v in rng.integers(-most, most + 1, size=2))
            dy = int(np.clip(dy, -ys.min(), 27 - ys.max())) if len(ys) else 0
            dx = int(np.clip(dx, -xs.min(), 27 - xs.max())) if len(xs) else 0
            if dy or dx or not len(ys):
                break
        out[i] = np.roll(d, (dy, dx), axis=(0, 1))  # no ink wraps: the shift stays within the margin
    return out


def bolder(images: np.ndarray, r: int) -> np.ndarray:
    """A (2r+1)x(2r+1) maximum filter: every stroke r px wider on each side, a marker instead of a pen."""
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.MaxFilter(2 * r + 1))) for im in images])


def turned(digits: np.ndarray, degrees: float) -> np.ndarray:
    """Each digit turned about the canvas's centre (positive: anticlockwise), bilinear, as Pillow turns."""
    return np.stack([np.asarray(Image.fromarray(d).rotate(degrees, resample=Image.Resampling.BILINEAR))
                     for d in digits])


def on_a_page(digits: np.ndarray, bold: int = 0) -> np.ndarray:
    """Each digit drawn 10x as large (280x280, bilinear), strokes widened by `bold` px each side, then put
    through the service's own preprocessing for an image that size (app/preprocess.py: crop, fit, centre)."""
    prep = Preprocess()
    out = np.zeros_like(digits)
    for i, d in enumerate(digits):
        page = np.asarray(Image.fromarray(d).resize((PAGE, PAGE), Image.Resampling.BILINEAR))
        page = bolder(page[None], bold)[0] if bold else page
        out[i] = gray28(b"page", None, PAGE * PAGE, prep, page)
    return out


def variation_sets(digits: np.ndarray, rng: np.random.Generator) -> dict[str, OodSet]:
    """Held-out MNIST digits written the ways handwriting varies: moved, bolder, turned. None of them is
    an anomaly; docs/anomaly-score.md#ordinary-variation sets a ceiling on the share of each flagged."""
    sets = {"shifted": OodSet(shifted(digits, rng), "held-out digits moved up to 4 px each way", "variation"),
            "bold": OodSet(bolder(digits, 1), "held-out digits with 3x3-wider strokes, 28x28", "variation"),
            "bold-page": OodSet(on_a_page(digits, bold=10), "held-out digits with 21x21-wider strokes on a "
                                "280x280 page", "variation")}
    for degrees in (15, -15, 30, -30):
        sets[f"turned{degrees:+d}"] = OodSet(turned(digits, degrees), f"held-out digits turned {degrees:+d} degrees "
                                             "(positive: anticlockwise)", "variation")
    return sets


# --- the suite --------------------------------------------------------------------------

def build_sets(mnist_test: np.ndarray, fashion_test: np.ndarray | None, n: int = 2000,
               seed: int = 0, held_out: np.ndarray | None = None) -> dict[str, OodSet]:
    """Every set, n images each (MNIST-derived sets from `mnist_test`, uint8 [N, 28, 28]; the variations
    from its `held_out` indices, the digits no score was fitted or calibrated on; without them, none)."""
    rng = np.random.default_rng(seed)
    fonts = available_fonts()
    pick = rng.permutation(len(mnist_test))[:n]
    sets: dict[str, OodSet] = {}
    if fashion_test is not None:
        sets["fashion"] = OodSet(fashion_test[:n], "Fashion-MNIST test images", "far")
    sets["noise"] = OodSet(rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8), "uniform noise", "far")
    sets["mnist-rot90"] = OodSet(np.rot90(mnist_test[pick], 1, axes=(1, 2)).copy(),
                                 "MNIST test digits rotated 90 degrees", "transformed")
    sets["mnist-mirror"] = OodSet(mnist_test[pick][:, :, ::-1].copy(), "MNIST test digits mirrored left-right",
                                  "transformed")
    glyph_sets: list[tuple[str, str, str, list[Path | None]]] = [
        ("letters-upper", UPPER, "capital letters that look like no digit, 19 fonts", fonts),
        ("letters-lower", LOWER, "small letters that look like no digit, 19 fonts", fonts),
        ("greek-cyrillic", GREEK_CYRILLIC, "Greek and Cyrillic letters", fonts),
        ("symbols", SYMBOLS, "punctuation, maths and other signs (+ x = ? # % & @ ...)", fonts),
    ]
    for name, chars, about, fs in glyph_sets:
        images, labels = render_glyphs(chars, fs, n, rng)
        sets[name] = OodSet(images, about, "near", labels)
    scripts: list[tuple[Path | None, str]] = [
        (d / f, chars) for f, chars in SCRIPT_FONTS.items() for d in FONT_DIRS if (d / f).is_file()]
    if scripts:
        per = -(-n // len(scripts))
        drawn = [render_glyphs(chars, [path], per, rng) for path, chars in scripts]
        order = rng.permutation(per * len(scripts))[:n]
        sets["other-scripts"] = OodSet(np.concatenate([d[0] for d in drawn])[order],
                                       "Hebrew, Devanagari, Armenian, Thai and Georgian letters", "near",
                                       np.concatenate([d[1] for d in drawn])[order])
    sets["scribbles"] = OodSet(random_strokes(n, rng), "one to three random pen strokes", "near")
    sets["doodles"] = OodSet(doodles(n, rng), "hand-drawn shapes: triangles, stars, crosses, ticks, arrows, hearts, "
                             "spirals, houses, waves, #", "near", doodle_kinds(n))
    sets["digit-pairs"] = OodSet(digit_pairs(mnist_test, n, rng), "two MNIST digits fitted into one box", "near")
    images, labels = render_glyphs(DIGITS, fonts, n, rng)
    sets["font-digits"] = OodSet(images, "digits 0-9 printed in 19 fonts: NOT anomalies, the share flagged should "
                                 "stay low", "digits", labels)
    if held_out is not None:
        sets |= variation_sets(mnist_test[held_out[:n]], rng)
    return sets


def cached_sets(cache: Path, build: Callable[[], dict[str, OodSet]]) -> dict[str, OodSet]:
    """The sets from `cache` (an .npz) if it was built by this version, else built and written there."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if int(f["__version__"]) == CACHE_VERSION:
                names = [k for k in f.files if not k.startswith("__")]
                return {k: OodSet(f[k], str(f[f"__about__{k}"]), str(f[f"__kind__{k}"]),
                                  f[f"__labels__{k}"] if f"__labels__{k}" in f.files else None) for k in names}
    sets = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"__version__": np.array(CACHE_VERSION)}
    for k, s in sets.items():
        arrays[k], arrays[f"__about__{k}"], arrays[f"__kind__{k}"] = s.images, np.array(s.about), np.array(s.kind)
        if s.labels is not None:
            arrays[f"__labels__{k}"] = s.labels
    np.savez_compressed(cache, **arrays)
    return sets


def sheet(images: np.ndarray, cols: int = 16) -> Image.Image:
    """A contact sheet of uint8 28x28 images, for looking at a set."""
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * 30, cols * 30), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = img
    return Image.fromarray(canvas, "L")
