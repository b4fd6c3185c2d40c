"""The web dashboard: `/` serves the page, `/static/...` its files, all from the package.

The page (api/static/index.html and its JavaScript modules) is a single-page app that talks to
`/v1` with `fetch`, sending the token the user typed as `Authorization: Bearer` (see
api/static/js/api.js). These routes hold no data and need no token: the page must load before
the user has typed one. They are left out of the OpenAPI schema, which describes the JSON API.

Nothing is fetched from elsewhere at run time (the GPU box has no internet): third-party files
are kept under api/static/vendor/, pinned by version in its manifest.json
(scripts/fetch-assets.sh). Their URLs carry the version, so they are cached for a year as
immutable; the app's own files are revalidated on every load (ETag), so an upgrade shows at once.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
VENDOR_PREFIX = "vendor/"

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

# What the page may load and where it may connect: its own origin only. No inline script or
# style, so an injected string in a job's spec or log cannot run; the page is not frameable.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

router = APIRouter(include_in_schema=False)
_files = StaticFiles(directory=STATIC_DIR)


@router.get("/")
def dashboard_page() -> Response:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": REVALIDATE, **SECURITY_HEADERS},
    )


@router.get("/static/{path:path}")
async def dashboard_file(path: str, request: Request) -> Response:
    # Starlette's StaticFiles resolves the path inside STATIC_DIR (no `..`, no symlink out) and
    # answers 304 to a matching If-None-Match; an unknown path raises its 404.
    response = await _files.get_response(path, request.scope)
    cache = IMMUTABLE if path.startswith(VENDOR_PREFIX) else REVALIDATE
    response.headers["Cache-Control"] = cache
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
