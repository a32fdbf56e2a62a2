"""Inference backends: one module per runtime behind one small interface (see base.py).

The names below are loaded on first use (PEP 562), so that importing the light registry
(`ssdopt.backends.registry`, read by the CLI's help) does not import ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Availability",
    "Backend",
    "BuildSpec",
    "CalibrationSpec",
    "Detections",
    "Engine",
    "HeadOutputs",
    "LayerInfo",
    "Runner",
    "backend_names",
    "get_backend",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("ssdopt.backends.base"), name)
    raise AttributeError(f"module 'ssdopt.backends' has no attribute {name!r}")
