"""Reuse the tiny exported detector of tests/backends for flow tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _tiny():
    name = "ssdopt_tests_tiny_model"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "backends" / "tiny_model.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny_export(request: pytest.FixtureRequest):
    return _tiny().cached_export(request.config)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
