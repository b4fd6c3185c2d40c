"""Jumpout: improved dropout for ReLU networks, with the paper's models, datasets and a training
engine that reports through callbacks."""

from jumpout.layer import ABLATIONS, Jumpout, ablation_kwargs, jumpout, list_ablations

__all__ = ["ABLATIONS", "Jumpout", "ablation_kwargs", "jumpout", "list_ablations"]
__version__ = "0.1.0"
