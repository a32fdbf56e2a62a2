"""Inference backends: one module per runtime behind one small interface (see base.py)."""

from __future__ import annotations

from ssdopt.backends.base import (
    BACKENDS,
    PRECISIONS,
    Availability,
    Backend,
    BuildSpec,
    CalibrationSpec,
    Detections,
    Engine,
    HeadOutputs,
    LayerInfo,
    Runner,
    backend_names,
    get_backend,
)

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
