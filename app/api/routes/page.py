"""The interactive page at `/`: static HTML, CSS and JavaScript (app/static/, no build step) that use
only the public API. VAE_PAGE=false leaves it out; `/` then redirects to the API docs."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[2] / "static"
router = APIRouter(include_in_schema=False)
docs_only = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    # no-cache: a browser revalidates (ETag) and so never shows a page older than the service it talks to
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@docs_only.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/docs")


class RevalidatedFiles(StaticFiles):
    """StaticFiles that asks browsers to revalidate: after an upgrade the page and its script stay in step."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount(app: FastAPI) -> None:
    app.mount("/static", RevalidatedFiles(directory=STATIC), name="static")
