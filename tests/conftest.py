"""Fixtures shared across the suite: the tiny exported detector of tests/backends/tiny_model.py
(registered as the module `ssdopt_tests_tiny_model`) and a tiny calibration set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _tiny_model_module():
    name = "ssdopt_tests_tiny_model"
    if name not in sys.modules:
        path = Path(__file__).parent / "backends" / "tiny_model.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny = _tiny_model_module()


@pytest.fixture(scope="session")
def tiny_export(request: pytest.FixtureRequest):
    return tiny.cached_export(request.config)


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_calibration_set(tmp_path_factory.mktemp("calibration"))
