"""Output format negotiation, one rule for every endpoint.

`?format=png|json` wins; otherwise the first of image/png or application/json in the
Accept header (by q-value) decides; otherwise the endpoint's default (PNG for
endpoints that return images, JSON for the rest). Asking an endpoint for a format it
cannot produce, by either route, is a 406.
"""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request

from app.exceptions import FormatNotAvailable

Format = Literal["png", "json"]
MEDIA: dict[Format, str] = {"png": "image/png", "json": "application/json"}


def _accepted(header: str) -> list[str]:
    ranked = []
    for i, part in enumerate(header.split(",")):
        fields = [f.strip() for f in part.split(";")]
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if fields[0] and q > 0:
            ranked.append((-q, i, fields[0].lower()))
    return [m for _, _, m in sorted(ranked)]


def negotiate(request: Request, fmt: Format | None, default: Format,
              allowed: tuple[Format, ...] = ("png", "json")) -> Format:
    """`fmt` is the already validated ?format= value, None when the query has none."""
    chosen = fmt
    if chosen is None:
        chosen = default
        for media in _accepted(request.headers.get("accept", "")):
            if media in ("image/png", "application/json"):
                chosen = "png" if media == "image/png" else "json"
                break
            if media in ("*/*", "image/*", "application/*"):
                break
    if chosen not in allowed:
        raise FormatNotAvailable(f"this endpoint answers {', '.join(allowed)}")
    return chosen
