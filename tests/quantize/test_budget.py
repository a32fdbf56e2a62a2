"""Accuracy-aware INT8: per-layer sensitivity and the fallback loop, with a fake evaluator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py
from onnx import numpy_helper

from ssdopt.errors import SsdoptError
from ssdopt.quantize.calibration_reader import CalibrationSpec, calibration_reader
from ssdopt.quantize.int8 import quantize_int8, quantize_with_budget, quantized_compute_nodes
from ssdopt.quantize.sensitivity import layer_sensitivity

MINMAX = CalibrationSpec(method="minmax")


def quantized_convs(path: Path) -> list[str]:
    model = onnx.load(str(path))
    convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
    return [name for name in quantized_compute_nodes(model) if name in convs]


def fake_map(path: Path) -> float:
    """0.50 for a float graph, minus 0.6 points per quantized convolution."""
    return 0.50 - 0.006 * len(quantized_convs(path))


def test_sensitivity_input_snr_matches_an_independent_qdq_of_the_image(
    tiny_export, tiny_calibration, tmp_path
):
    reader = calibration_reader(tiny_calibration, 64)
    quantize_int8(
        tiny_export.model,
        tmp_path / "q.onnx",
        target="openvino",
        reader=reader,
        calibration=MINMAX,
        preprocess_graph=False,
    )
    batches = [tiny.fresh_images(2, seed=s) for s in range(3)]  # not multiples of 1/255, unlike JPEG pixels
    rows = layer_sensitivity(tiny_export.model, tmp_path / "q.onnx", batches, op_types=("Conv",))
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(r["node"] for r in rows) == sorted(quantized_convs(tmp_path / "q.onnx"))
    assert [r["loss_db"] for r in rows] == sorted((r["loss_db"] for r in rows), reverse=True)
    # The first conv reads the image through images_QuantizeLinear: recompute that SNR with numpy.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    x = np.concatenate(batches).astype(np.float64)
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    expected = 10 * np.log10(np.sum(x**2) / np.sum((x - xq) ** 2))
    first = next(n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0].startswith("images"))
    row = next(r for r in rows if r["node"] == first)
    assert row["snr_in_db"] == pytest.approx(expected, abs=0.01)
    assert row["snr_out_db"] < row["snr_in_db"]


def test_fallback_keeps_the_most_sensitive_layers_until_within_budget(ort_budget):
    seen: list[Path] = []

    def evaluate(path: Path) -> float:
        seen.append(path)
        return fake_map(path)

    result = ort_budget(evaluate, budget_points=1.0, layers_per_round=2, max_rounds=4)
    # 7 convs quantized: 4.2 points; each round keeps 2 more in float: 3.0, 1.8, 0.6 -> within budget.
    assert [r["drop_points"] for r in result.rounds] == pytest.approx([4.2, 3.0, 1.8, 0.6])
    assert result.within_budget and result.drop_points == pytest.approx(0.6)
    assert len(result.excluded) == 6 and len(set(result.excluded)) == 6
    assert quantized_convs(result.path) == [
        n for n in quantized_convs(result.path) if n not in result.excluded
    ]
    assert len(quantized_convs(result.path)) == 1
    first_ranking = [row["node"] for row in result.rounds[0]["sensitivity"]]
    assert result.excluded[:2] == first_ranking[:2]  # the worst layers fell back first
    assert result.record["fallback"]["fallback_layers"] == result.excluded
    assert len(seen) == 5  # the float graph once, then one per round


def test_fallback_reports_failure_with_the_numbers(tiny_export, tiny_calibration, tmp_path) -> None:
    reader = calibration_reader(tiny_calibration, 64)
    result = quantize_with_budget(
        tiny_export.model,
        tmp_path / "int8.onnx",
        target="openvino",
        reader=reader,
        evaluate=lambda path: 0.30 - 0.001 * len(quantized_convs(path)),
        fp32_map=0.50,
        calibration=MINMAX,
        max_rounds=1,
        layers_per_round=1,
        fallback_op_types=("Conv",),
    )
    assert not result.within_budget
    assert [r["drop_points"] for r in result.rounds] == pytest.approx([20.7, 20.6])
    assert result.drop_points == pytest.approx(20.6) and len(result.excluded) == 1  # the most accurate round
    assert result.path.is_file() and [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


def test_evaluate_must_return_a_fraction(tiny_export, tiny_calibration, tmp_path) -> None:
    with pytest.raises(SsdoptError, match="fraction"):
        quantize_with_budget(
            tiny_export.model,
            tmp_path / "int8.onnx",
            target="onnxruntime",
            reader=calibration_reader(tiny_calibration, 64),
            evaluate=lambda path: 45.0,
            calibration=MINMAX,
        )
    assert not (tmp_path / "int8.onnx").exists()


def test_sensitivity_covers_non_conv_nodes_by_default(tiny_export, tiny_calibration, tmp_path) -> None:
    reader = calibration_reader(tiny_calibration, 64)
    quantize_int8(
        tiny_export.model, tmp_path / "q.onnx", target="onnxruntime", reader=reader, calibration=MINMAX
    )
    rows = layer_sensitivity(tiny_export.model, tmp_path / "q.onnx", [tiny.fresh_images(2)])
    types = {row["op_type"] for row in rows}
    assert "Conv" in types and types - {"Conv"}  # e.g. the HardSwish decomposition (HardSigmoid, Mul)
    assert not types & {"Reshape", "Transpose"}
