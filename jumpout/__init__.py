"""Jumpout: improved dropout for ReLU networks, with the paper's models, datasets and a training
engine that reports through callbacks.

Importing the package is cheap: the layer (and with it torch) loads on first use of one of its
names, so the torch-free `jumpout.spec` serves processes that never train (the API).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ABLATIONS", "Jumpout", "ablation_kwargs", "jumpout", "list_ablations"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("jumpout.layer"), name)
    raise AttributeError(f"module 'jumpout' has no attribute {name!r}")
