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


# Whole-process fault, soak, server and flow tests: `make test` (CI) runs them; a developer can skip
# them locally with `pytest -m "not slow"` (about a third of the suite's time).
SLOW_MODULES = {
    "tests/reliability/test_soak.py",
    "tests/reliability/test_faults_kill.py",
    "tests/reliability/test_faults_disk.py",
    "tests/reliability/test_mlflow_server.py",
    "tests/flows/test_deployment.py",
    "tests/flows/test_optimize_flow.py",
    "tests/test_dvc_pipeline.py",
    "tests/test_byo.py",
    "tests/infra/test_shared_mlflow.py",
    "tests/infra/test_shared_prefect.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parent.parent
    for item in items:
        if str(Path(item.fspath).resolve().relative_to(root)) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
