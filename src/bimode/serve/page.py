"""The chat page `bimode serve` shows at `/` (off with `--no_ui`): three static files shipped inside the package
(serve/ui/), no CDN, no framework. The page talks to the server's own /v1/chat/completions like any other client,
so it needs nothing from the server beyond what the OpenAI shape carries (and each choice's `bimode` field).

The files are read once, when the app is built. The page's Content-Security-Policy allows only its own script
and style and images from data:/blob: URLs (the user's own uploads): even if model output ever reached the page
as HTML, no script or remote fetch could run from it (the page writes model output as text only).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new bimode version's page is fetched again, never an old one from cache
}


def read_assets() -> dict[str, bytes]:
    """The page's files, from the installed package (the wheel carries serve/ui/*)."""
    folder = files("bimode.serve").joinpath("ui")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def add_page(app: FastAPI) -> None:
    """`/` (the page) and `/ui/app.js`, `/ui/style.css` on `app`."""
    assets = read_assets()

    def asset(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def page():
        return asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        if name not in ASSETS or name == "index.html":
            return Response("not found", status_code=404, media_type="text/plain")
        return asset(name)
