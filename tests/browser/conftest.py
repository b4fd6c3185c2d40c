"""Fixtures for the dashboard's browser tests: Debian's headless Chromium driven by selenium
through chromedriver (installed with apt-get when missing: CI runs as root on a fresh machine;
the tests skip, saying why, when that is impossible), and the real service as processes
(tests/integration/conftest.py's `Stack`: uvicorn with its access log, a Celery worker, the
reaper, Redis, SQLite) with auth on, as deployed.

Every test module here is marked `browser` (`make test-browser`; not part of `make test`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
WINDOW = (1440, 1000)

# The integration tests' process fixtures, loaded by path (test directories are not packages).
_spec = importlib.util.spec_from_file_location(
    "integration_processes", REPO / "tests" / "integration" / "conftest.py"
)
processes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(processes)


def _browser_binaries() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages if they are missing."""
    browser, driver = _browser_binaries()
    if browser and driver:
        return browser, driver
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "chromium and chromium-driver are not installed, and this is not root with apt-get "
            "to install them: apt-get install chromium chromium-driver"
        )
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    browser, driver = _browser_binaries()
    if not (browser and driver):
        pytest.skip(f"could not install chromium with apt-get:\n{result.stderr[-2000:]}")
    return browser, driver


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e .[dev]")
    return ensure_chromium()


@pytest.fixture
def browser(chromium) -> Iterator:
    """A fresh headless Chromium (its own profile: no token from an earlier test), recording
    every request it makes (the performance log) and the page's console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-extensions", "--no-first-run",
        "--hide-scrollbars",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class DashboardStack(processes.Stack):
    """The service with uvicorn's access log on (the auth test reads it for tokens)."""

    def start(self, name: str):
        if name != "api":
            return super().start(name)
        argv = [
            sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
            "--port", str(self.port),
        ]  # fmt: skip
        process = processes.Process(name, argv, env=self.env, log_dir=self.logs)
        self.processes[name] = process
        self._wait_for_api(process)
        return process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_token(self, name: str, *, admin: bool = False) -> str:
        argv = ["-m", "api", "token", "create", "--name", name] + (["--admin"] if admin else [])
        return self.run(*argv).stdout.strip()


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[DashboardStack]:
    """The whole service once for the browser suite, on SQLite, auth required."""
    home = tmp_path_factory.mktemp("dashboard-stack")
    with processes.running_stack(
        home, stack_class=DashboardStack, JUMPOUT_AUTH_REQUIRED="true"
    ) as service:
        yield service


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
