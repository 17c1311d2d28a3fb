"""Training images for the density-ratio statistic (anomaly/ratio.py): glyphs of scripts the OOD
suite does not use, and digits printed in the font faces it does not use.

Both are drawn exactly as the suite's glyph sets are (`ood_sets.render_glyphs`: random weight, slant and
rotation, fitted like MNIST), so that a model of them and a model of digits differ in *shape* and not in
how the ink was put down. What keeps the evaluation honest is what is left out:

- `OTHER_SCRIPTS` shares no script with the suite (Latin, Greek, Cyrillic, Hebrew, Devanagari, Armenian,
  Thai, Georgian, the symbols) nor with their close relatives (other Brahmic scripts of North India,
  Lao, Samaritan, Coptic, Glagolitic...): `tests/test_glyph_pool.py` checks it;
- `printed_digit_fonts` is every installed Latin face *except* the suite's own (`ood_sets.FONT_FILES`);
  they are other faces of the same five families, so the suite's `font-digits` set is unseen by face,
  not by family (docs/benchmarks.md says so beside its figures).

Many letters of a large alphabet look like a digit (any script has its 0, 1, 3 and 7); none is removed,
since the pool is a density of "characters", not a set of negatives: a digit-like glyph raises the
background's likelihood of digit-like images a little, and the ratio is fitted with that in it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from anomaly.suite import DIGITS, FONT_DIRS, FONT_FILES, SCRIPT_FONTS, render_glyphs

NOTO = "truetype/noto"
# Noto Sans families, one per script; their Regular and Bold faces are used where installed.
OTHER_SCRIPTS = (
    "Ethiopic", "CanadianAboriginal", "Cherokee", "Tifinagh", "Runic", "Vai", "Yi", "NKo", "Thaana", "Arabic",
    "Mongolian", "Tamil", "Telugu", "Kannada", "Malayalam", "Sinhala", "Khmer", "Myanmar", "Javanese", "LinearB",
    "OldTurkic", "Bamum", "Balinese", "Osage", "Adlam", "OlChiki", "Lisu", "TaiTham", "Cham", "Batak", "Buginese",
    "Sundanese", "Deseret", "Shavian", "EgyptianHieroglyphs", "AnatolianHieroglyphs", "Tagalog", "Hanunoo",
    "Rejang", "Lepcha", "Limbu", "Mro", "Wancho", "Medefaidrin", "Miao", "PahawhHmong", "Osmanya", "SoraSompeng",
)
MAX_PER_SCRIPT = 400  # the syllabaries and hieroglyphs have thousands: a sample keeps the scripts level
LATIN_FAMILIES = ("truetype/dejavu", "truetype/liberation", "truetype/freefont", "opentype/urw-base35")
LATIN_NOTO = ("NotoSans-", "NotoSerif-", "NotoSansDisplay-", "NotoSerifDisplay-", "NotoSansMono-")
NOT_DIGIT_FACES = ("Symbol", "D050000L", "MathTeX")  # dingbats and maths faces: their "digits" are not digits


class MissingFonts(RuntimeError):
    """The fonts the pool is drawn with are not installed (Debian: fonts-noto-core and the Latin families)."""


def check_fonts() -> None:
    """Raises MissingFonts, with the packages to install, unless both pools can be drawn."""
    scripts = sum(bool(script_fonts(s)) for s in OTHER_SCRIPTS)
    if scripts < len(OTHER_SCRIPTS) // 2:
        raise MissingFonts(f"only {scripts} of the {len(OTHER_SCRIPTS)} Noto script fonts the score's glyph model "
                           "is drawn from are installed (apt-get install fonts-noto-core)")
    faces = len(printed_digit_fonts())
    if faces < 10:
        raise MissingFonts(f"only {faces} Latin font faces besides the OOD suite's are "
                           "installed (apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf "
                           "fonts-urw-base35)")


def script_fonts(script: str) -> list[Path]:
    """The installed Regular and Bold faces of Noto Sans `script`."""
    return [d / NOTO / f"NotoSans{script}-{w}.ttf" for d in FONT_DIRS for w in ("Regular", "Bold")
            if (d / NOTO / f"NotoSans{script}-{w}.ttf").is_file()]


def script_letters(font: Path, rng: np.random.Generator) -> str:
    """The letters and pictographs a font draws outside Latin, Greek and the punctuation (up to
    MAX_PER_SCRIPT, drawn at random where there are more)."""
    from fontTools.ttLib import TTFont  # a dependency of matplotlib; only fitting the score needs it

    cmap = TTFont(str(font), lazy=True).getBestCmap()
    chars = [chr(c) for c in sorted(cmap) if c > 0x2FF and unicodedata.category(chr(c)) in ("Lo", "Lu", "Ll", "So")]
    if len(chars) > MAX_PER_SCRIPT:
        chars = list(rng.choice(chars, MAX_PER_SCRIPT, replace=False))
    return "".join(chars)


def other_script_glyphs(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28]: letters of OTHER_SCRIPTS, the same number from each installed script."""
    check_fonts()
    rng = np.random.default_rng(seed)
    found = [fonts for s in OTHER_SCRIPTS if (fonts := script_fonts(s))]
    shares = np.diff(np.linspace(0, n, len(found) + 1).astype(int))
    parts = [render_glyphs(script_letters(fonts[0], rng), fonts, int(m), rng)[0]
             for fonts, m in zip(found, shares, strict=True)]
    return np.concatenate(parts)


def printed_digit_fonts() -> list[Path]:
    """Every installed Latin face but the OOD suite's own, and but symbol and maths faces."""
    suite = {Path(f).name for f in FONT_FILES}
    faces = [f for d in FONT_DIRS for fam in LATIN_FAMILIES for f in sorted((d / fam).glob("*.[ot]tf"))]
    faces += [f for d in FONT_DIRS for f in sorted((d / NOTO).glob("*.ttf")) if f.name.startswith(LATIN_NOTO)]
    return [f for f in faces if f.name not in suite and not any(s in f.name for s in NOT_DIGIT_FACES)]


def printed_digits(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28]: the ten digits in `printed_digit_fonts`, drawn as the suite draws its glyphs."""
    check_fonts()
    return render_glyphs(DIGITS, printed_digit_fonts(), n, np.random.default_rng(seed))[0]


# the suite's scripts, by the Noto family name they are drawn with (`ood_sets.SCRIPT_FONTS`)
SUITE_SCRIPTS = tuple(Path(f).stem.removeprefix("NotoSans").split("-")[0] for f in SCRIPT_FONTS)
