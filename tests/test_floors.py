"""The house reads as floors: library, core, then the API and the worker side by side. Each module
is imported in a fresh interpreter and the modules it pulled in are checked, so an import that
runs back up a floor (or drags torch into the API) fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def loaded_by(*modules: str) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | set(sys.modules))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        # The library: torch yes, nothing of the service.
        (
            ["jumpout", "jumpout.engine", "jumpout.cli", "jumpout.data", "jumpout.models"],
            {"jobstore", "api", "worker", "launcher", "fastapi", "celery", "sqlalchemy"},
        ),
        # The spec is what the service uses of the library: pure Python.
        (["jumpout.spec"], {"torch", "torchvision", "numpy", "jumpout.layer"}),
        # The core: no torch, no web framework, nothing above it.
        (
            ["jobstore.jobs", "jobstore.db", "jobstore.queue", "jobstore.errors"],
            {"torch", "torchvision", "fastapi", "api", "worker", "launcher"},
        ),
        # The API process: no torch, no Celery (memory, start-up), no worker.
        (["api.main", "api.cli"], {"torch", "torchvision", "worker", "launcher", "celery"}),
        # The worker side: never the API (the trainer imports torch when it trains, not here).
        (
            ["worker.tasks", "worker.supervisor", "worker.reaper", "worker.trainer"],
            {"api", "fastapi", "launcher", "torch"},
        ),
        # The launcher only starts processes.
        (["launcher.stack"], {"api", "worker", "torch", "fastapi"}),
    ],
    ids=["library", "spec", "core", "api", "worker", "launcher"],
)
def test_no_import_runs_up_a_floor(modules, forbidden):
    assert loaded_by(*modules) & forbidden == set()
