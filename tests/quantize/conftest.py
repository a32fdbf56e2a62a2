"""Fixtures of the int8 tests: the accuracy-budget run of the tiny model that several tests make."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ssdopt.quantize.calibration_reader import CalibrationSpec, calibration_reader
from ssdopt.quantize.int8 import BudgetResult, quantize_with_budget


@pytest.fixture
def ort_budget(tiny_export, tiny_calibration, tmp_path: Path) -> Callable[..., BudgetResult]:
    """`run(evaluate, **options)`: quantize_with_budget of the tiny model into tmp_path/int8.onnx for
    onnxruntime, min/max calibration, only convolutions may fall back; `options` are the test's own."""

    def run(evaluate: Callable[[Path], float], **options: Any) -> BudgetResult:
        return quantize_with_budget(
            tiny_export.model,
            tmp_path / "int8.onnx",
            target="onnxruntime",
            reader=calibration_reader(tiny_calibration, 64),
            evaluate=evaluate,
            calibration=CalibrationSpec(method="minmax"),
            fallback_op_types=("Conv",),
            **options,
        )

    return run
