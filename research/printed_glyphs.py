"""Where single printed characters land among MNIST digits, through the service as a user sends them.

Each character is printed black on a white page (`--size` px tall on a page 1.5 times as wide),
sent as a PNG to the real app's `POST /anomaly-score` (in-process, bundled models unless
`--models-dir`), and placed by each score's percentile of held-out MNIST digits. Printed digits
should land low; "+", "x", "A"... high. The README's anomaly examples quote these figures.

    python -m research.printed_glyphs
    python -m research.printed_glyphs --chars '?+xAT' --fonts /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFont

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FONTS = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
         Path("/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf")]


def printed(char: str, font: Path, size: int) -> bytes:
    """The character `size` px tall (its ink), centred on a white page, as a PNG."""
    side = size * 3 // 2
    _, top, _, bottom = ImageFont.truetype(str(font), size).getbbox(char)
    scale = size / max(bottom - top, 1)  # glyphs of different heights all print `size` px of ink
    face = ImageFont.truetype(str(font), max(1, round(size * scale)))
    left, top, right, bottom = face.getbbox(char)
    page = Image.new("L", (side, side), 255)
    ImageDraw.Draw(page).text(((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), char,
                              font=face, fill=0)
    buf = io.BytesIO()
    page.save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", default="?+xAT2347")
    p.add_argument("--fonts", type=Path, nargs="+", default=FONTS)
    p.add_argument("--size", type=int, default=160, help="ink height in px")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="vae")
    args = p.parse_args(argv)
    fonts = [f for f in args.fonts if f.is_file()]
    print(f"{args.model}: percentile among held-out MNIST digits, per score (fonts: "
          + ", ".join(f.stem for f in fonts) + f"; {args.size} px of ink)")
    heads = [f"{f.stem.split('-')[0]} {m}" for f in fonts for m in ("default", "bound")]
    print(f"{'char':<6}" + "".join(f"{h:>24}" for h in heads))
    with TestClient(create_app(Settings(models_dir=args.models_dir, default_model=args.model))) as client:
        for char in args.chars:
            cells = []
            for font in fonts:
                page = printed(char, font, args.size)
                for method in ("", "&method=bound"):
                    r = client.post(f"/anomaly-score?model={args.model}{method}", content=page,
                                    headers={"content-type": "image/png"})
                    r.raise_for_status()
                    body = r.json()
                    cells.append(f"{body['percentile']:.1f}{' flagged' if body['is_anomaly'] else ''}")
            print(f"{char!r:<6}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
