"""The dashboard's files as the API serves them (api/routes/dashboard.py): all from the package,
the vendored libraries exactly as pinned in api/static/vendor/manifest.json, nothing loaded from
elsewhere, long caching only for versioned files, public without a token, out of the OpenAPI
schema. What the page does in a browser is tests/browser/test_dashboard_browser.py.

On SQLite only: the page does not touch the database.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from api.routes.dashboard import IMMUTABLE, STATIC_DIR

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

VENDOR = STATIC_DIR / "vendor"
MANIFEST = json.loads((VENDOR / "manifest.json").read_text())
APP_FILES = sorted(
    path for path in STATIC_DIR.rglob("*") if path.is_file() and VENDOR not in path.parents
)
VENDOR_FILES = [
    (package, item) for package in MANIFEST["packages"] for item in package["files"]
]  # fmt: skip


def test_the_vendored_files_are_the_pinned_ones():
    listed = set()
    for package, item in VENDOR_FILES:
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"]), package
        assert package["directory"] == f"{package['name']}-{package['version']}"
        assert package["source"].startswith("https://registry.npmjs.org/")
        path = VENDOR / package["directory"] / item["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == item["sha256"], path
        listed.add(path)
    on_disk = {
        path for path in VENDOR.rglob("*") if path.is_file() and path.name != "manifest.json"
    }
    assert on_disk == listed, "a file in api/static/vendor/ that the manifest does not pin"


def test_the_page_loads_only_files_of_this_app():
    page = (STATIC_DIR / "index.html").read_text()
    for package, item in VENDOR_FILES:
        if item["file"].endswith(".js"):
            assert f"/static/vendor/{package['directory']}/{item['file']}" in page
    for path in APP_FILES:
        text = path.read_text()
        # No CDN, no web font, no remote anything: the GPU box has no internet.
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path
        assert not re.search(r"""(import|fetch)\s*\(?\s*["'`]https?://""", text), path
        assert "EventSource" not in text or path.name == "api.js", path
    for src in re.findall(r"""(?:src|href)="(/[^"#]*)\"""", page):
        assert (STATIC_DIR / src.removeprefix("/static/")).is_file(), src


def test_the_token_is_never_put_in_a_url():
    scripts = "\n".join(p.read_text() for p in APP_FILES if p.suffix == ".js")
    assert "sessionStorage" in scripts and "localStorage" not in scripts
    assert "Authorization" in scripts
    # The stream is read with fetch (a header), not EventSource (which could only use the URL).
    assert "new EventSource" not in scripts
    assert not re.search(r"[?&](token|access_token)=", scripts)


@SQLITE_ONLY
def test_the_page_and_its_files_are_served_with_their_headers(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"

    for package, item in VENDOR_FILES:
        response = client.get(f"/static/vendor/{package['directory']}/{item['file']}")
        assert response.status_code == 200
        assert response.headers["cache-control"] == IMMUTABLE
        assert hashlib.sha256(response.content).hexdigest() == item["sha256"]

    script = client.get("/static/js/main.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.headers["cache-control"] == "no-cache"
    assert script.headers["x-content-type-options"] == "nosniff"
    # Revalidation: an unchanged file is a 304 without a body.
    again = client.get("/static/js/main.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@SQLITE_ONLY
@pytest.mark.parametrize(
    "path",
    [
        "/static/nothing.js",
        "/static/../routes/dashboard.py",
        "/static/%2e%2e/routes/dashboard.py",
        "/static/..%2f..%2fmain.py",
        "/static/",
        "/static/vendor",
    ],
)
def test_nothing_outside_the_static_folder_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.text[:200])
    assert response.json()["error"]["code"] == "not_found"


@SQLITE_ONLY
def test_the_page_needs_no_token_and_is_not_in_the_schema(client, configure):
    configure(auth_required=True)
    assert client.get("/").status_code == 200
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/v1/jobs").status_code == 401
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


def test_every_app_file_is_in_the_package():
    # pyproject.toml's package-data must ship what the page loads (a wheel, the Docker image).
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(r'api\s*=\s*\[[^\]]*"static/\*\*/\*"', pyproject)
