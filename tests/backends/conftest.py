"""Shared fixtures: the tiny exported detector and a tiny calibration set (see tiny_model.py).

When ssdopt.export lands, `tiny_export` can export through it; the engines only need its files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _helper():
    """tests/backends/tiny_model.py, importable from any test directory."""
    name = "ssdopt_tests_tiny_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiny_model.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny = _helper()


@pytest.fixture(scope="session")
def tiny_export(request: pytest.FixtureRequest):
    return tiny.cached_export(request.config)


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_calibration_set(tmp_path_factory.mktemp("calibration"))
