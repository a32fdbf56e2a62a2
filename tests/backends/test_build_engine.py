"""build_engine: content-addressed reuse, atomic failure, keys that change with what changes the engine."""

from __future__ import annotations

import os

import pytest

from ssdopt.backends import BuildSpec, CalibrationSpec, get_backend
from ssdopt.backends.onnxruntime import OnnxRuntimeBackend
from ssdopt.build import build_engine
from ssdopt.errors import SsdoptError


def _spec(calibration, method: str = "minmax", **fields) -> BuildSpec:
    return BuildSpec(calibration=CalibrationSpec(directory=calibration, method=method), **fields)


def test_unchanged_build_is_reused_without_rebuilding(
    tiny_export, tiny_calibration, tmp_path, monkeypatch
) -> None:
    first = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    stamp = os.stat(first.file).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although nothing changed")

    monkeypatch.setattr(OnnxRuntimeBackend, "_compile", fail)
    second = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    assert second.path == first.path and os.stat(second.file).st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_corrupt_cached_engine_is_rebuilt_in_place(tiny_export, tiny_calibration, tmp_path) -> None:
    first = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    first.file.write_bytes(b"garbage")
    second = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    assert second.path == first.path
    get_backend("onnxruntime").load(second.path)  # sha256 check passes again
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_failing_build_leaves_no_directory(tiny_export, tiny_calibration, tmp_path, monkeypatch) -> None:
    def explode(self, onnx_path, model, spec, tmp):
        (tmp / "engine.onnx").write_bytes(b"half written")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(OnnxRuntimeBackend, "_compile", explode)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    assert list(tmp_path.iterdir()) == []


def test_failing_quantization_leaves_no_directory(tiny_export, tmp_path) -> None:
    spec = BuildSpec(calibration=CalibrationSpec(directory=tmp_path / "missing", method="minmax"))
    with pytest.raises(SsdoptError, match="manifest"):
        build_engine("onnxruntime", "int8", tiny_export.model, tmp_path / "engines", spec)
    assert not (tmp_path / "engines").exists() or list((tmp_path / "engines").iterdir()) == []


def test_key_follows_precision_and_calibration(tiny_export, tiny_calibration, tmp_path) -> None:
    fp32 = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration))
    fp32_other_method = build_engine(
        "onnxruntime", "fp32", tiny_export.model, tmp_path, _spec(tiny_calibration, "percentile")
    )
    assert fp32_other_method.path == fp32.path  # calibration does not matter for fp32
    minmax = build_engine("onnxruntime", "int8", tiny_export.model, tmp_path, _spec(tiny_calibration))
    percentile = build_engine(
        "onnxruntime", "int8", tiny_export.model, tmp_path, _spec(tiny_calibration, "percentile")
    )
    assert len({fp32.path, minmax.path, percentile.path}) == 3
    assert minmax.metadata["build_key"] != percentile.metadata["build_key"]
    assert percentile.metadata["quantization"]["calibration"]["method"] == "percentile"


def test_q_dq_graph_is_refused_for_fp32(tiny_export, tiny_calibration, tmp_path) -> None:
    int8 = build_engine("onnxruntime", "int8", tiny_export.model, tmp_path, _spec(tiny_calibration))
    with pytest.raises(SsdoptError, match="Q/DQ graph"):
        build_engine("openvino", "fp32", int8.path / "graph.onnx", tmp_path)
    prequantized = build_engine("openvino", "int8", int8.path / "graph.onnx", tmp_path)
    assert prequantized.metadata["quantization"]["prequantized"] is True


def test_cli_build_takes_defaults_from_params(tiny_export, tiny_calibration, tmp_path, monkeypatch) -> None:
    import typer
    import yaml
    from typer.testing import CliRunner

    from ssdopt.commands_engines import build

    params = {
        "build": {
            "backend": "openvino",
            "precision": "int8",
            "onnx": str(tiny_export.model),
            "out": str(tmp_path / "engines"),
            "calibration": {"directory": str(tiny_calibration), "method": "minmax"},
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command("build")(build)
    app.command("noop")(lambda: None)  # two commands: typer keeps "build" as a subcommand
    result = CliRunner().invoke(app, ["build", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    [engine_dir] = list((tmp_path / "engines").iterdir())
    assert engine_dir.name.startswith("openvino-fp32-")
    assert "fused into one runtime layer: **3 of 3**" in result.output


def test_accuracy_budget_build_records_the_fallback(tiny_export, tiny_calibration, tmp_path) -> None:
    import onnx

    from ssdopt.build import AccuracyBudget
    from ssdopt.quantize.int8 import quantized_compute_nodes

    def evaluate(graph) -> float:  # fake mAP: 0.5 minus 0.4 points per int8 convolution
        model = onnx.load(str(graph))
        convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
        return 0.5 - 0.004 * len(convs & set(quantized_compute_nodes(model)))

    budget = AccuracyBudget(evaluate, budget_points=1.0, layers_per_round=3)
    spec = _spec(tiny_calibration, int8_quantizer="onnxruntime")  # the ORT-made Q/DQ route
    engine = build_engine("openvino", "int8", tiny_export.model, tmp_path, spec, accuracy=budget)
    fallback = engine.metadata["quantization"]["fallback"]
    assert fallback["within_budget"] and fallback["drop_points"] <= 1.0
    assert fallback["fallback_layers"] and fallback["rounds"][0]["drop_points"] == pytest.approx(2.8)
    again = build_engine("openvino", "int8", tiny_export.model, tmp_path, spec, accuracy=budget)
    assert again.path == engine.path
    plain = build_engine("openvino", "int8", tiny_export.model, tmp_path, spec)
    assert plain.path != engine.path


def test_accuracy_budget_of_the_nncf_route_keeps_layers_float(
    tiny_export, tiny_calibration, tmp_path
) -> None:
    import openvino as ov

    from ssdopt.build import AccuracyBudget
    from ssdopt.quantize.nncf_openvino import quantized_ops

    seen = []

    def evaluate(graph) -> float:  # fake mAP: 0.5 minus 0.4 points per int8 convolution of the IR
        seen.append(graph.suffix)
        if graph.suffix == ".onnx":
            return 0.5
        return 0.5 - 0.004 * len(quantized_ops(ov.Core().read_model(str(graph))))

    budget = AccuracyBudget(evaluate, budget_points=1.0, layers_per_round=3)
    engine = build_engine(
        "openvino", "int8", tiny_export.model, tmp_path, _spec(tiny_calibration), accuracy=budget
    )
    quantization = engine.metadata["quantization"]
    fallback = quantization["fallback"]
    assert seen[0] == ".onnx" and set(seen[1:]) == {".xml"}
    assert fallback["within_budget"] and fallback["drop_points"] <= 1.0
    assert fallback["rounds"][0]["drop_points"] == pytest.approx(2.8) and len(fallback["rounds"]) > 1
    kept = set(fallback["fallback_layers"])
    assert kept and kept == set(quantization["excluded_fallback"])
    assert not kept & set(quantization["quantized_nodes"])  # the ignored_scope names stayed float
    ir = ov.Core().read_model(str(engine.path / "engine.xml"))
    assert set(quantized_ops(ir)) == set(quantization["quantized_nodes"])
