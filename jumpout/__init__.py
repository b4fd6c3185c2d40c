"""Jumpout: improved dropout for ReLU networks, with the paper's models, datasets and a training
engine that reports through callbacks.

Importing the package is cheap: the layer (and with it torch) loads on first use of one of its
names, so the torch-free `jumpout.spec` serves processes that never train (the API).
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module it comes from, imported on first use.
_SOURCES = {
    "ABLATIONS": "jumpout.layer",
    "Jumpout": "jumpout.layer",
    "ablation_kwargs": "jumpout.layer",
    "jumpout": "jumpout.layer",
    "list_ablations": "jumpout.layer",
    "load_model": "jumpout.engine",  # a checkpoint file -> the trained model, in eval mode
}
__all__ = sorted(_SOURCES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(importlib.import_module(_SOURCES[name]), name)
    raise AttributeError(f"module 'jumpout' has no attribute {name!r}")
