"""INT8 exclusions chosen by measured latency: the greedy probe with fake timers, the reasons recorded,
and ORT keeping an excluded convolution float (its WeightBiasQuantization would re-quantize it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ssdopt.backends import BuildSpec, CalibrationSpec, get_backend
from ssdopt.build import build_engine
from ssdopt.quantize.calibration_reader import calibration_reader
from ssdopt.quantize.int8 import quantize_int8, quantized_compute_nodes
from ssdopt.quantize.latency import candidate_groups, choose_latency_exclusions

MINMAX = CalibrationSpec(method="minmax")


def depthwise_graph(path: Path) -> Path:
    """x -> Conv (dense) -> Conv (depthwise, group 4) -> Mul(x, x) -> y."""
    w1 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="dense"),
        helper.make_node("Conv", ["a", "w2"], ["b"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["b", "b"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w1, w2],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


class FakeQuantizer:
    """`quantize(exclude, out)`: writes the excluded names as JSON; every other node "runs int8"."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.calls: list[list[str]] = []

    def __call__(self, exclude: list[str], out: Path) -> list[str]:
        self.calls.append(list(exclude))
        out.write_text(json.dumps(sorted(exclude)))
        return [n for n in self.names if n not in exclude]


def cost_timer(int8_cost: dict[str, float], float_cost: dict[str, float]):
    """Latency of a fake graph = sum over nodes of its int8 or float cost (seconds)."""
    seen: list[list[Path]] = []

    def measure(paths: list[Path]) -> list[float]:
        seen.append(list(paths))
        out = []
        for path in paths:
            floating = set(json.loads(path.read_text()))
            out.append(sum(float_cost[n] if n in floating else int8_cost[n] for n in int8_cost))
        return out

    measure.seen = seen  # type: ignore[attr-defined]
    return measure


def test_groups_split_depthwise_convs_from_dense_ones(tmp_path) -> None:
    model = onnx.load(str(depthwise_graph(tmp_path / "g.onnx")))
    assert candidate_groups(model, ["dense", "dw", "mul"]) == {"depthwise Conv": ["dw"], "Mul": ["mul"]}
    assert candidate_groups(model, ["dense"]) == {}  # only nodes that run int8 are candidates


def test_keeps_float_only_the_groups_measured_faster_in_float(tmp_path) -> None:
    source = depthwise_graph(tmp_path / "g.onnx")
    quantize = FakeQuantizer(["dense", "dw", "mul"])
    # depthwise: int8 3 ms, float 1 ms (float pays); mul: int8 1 ms, float 2 ms (int8 pays)
    timer = cost_timer({"dense": 5e-3, "dw": 3e-3, "mul": 1e-3}, {"dense": 9e-3, "dw": 1e-3, "mul": 2e-3})
    chosen, record = choose_latency_exclusions(source, quantize, ["user"], tmp_path, timer)
    assert chosen == ["dw"]
    assert [(p["group"], p["kept_float"]) for p in record["probes"]] == [
        ("depthwise Conv", True),
        ("Mul", False),
    ]
    assert record["probes"][0]["int8_ms"] == pytest.approx(9.0)
    assert record["probes"][0]["float_ms"] == pytest.approx(7.0)
    # the Mul probe is timed against the graph with dw already float, and keeps the user's exclusion
    assert quantize.calls == [["user"], ["dw", "user"], ["dw", "mul", "user"]]
    assert record["probes"][1]["int8_ms"] == pytest.approx(7.0)


def test_margin_keeps_int8_when_float_is_barely_faster(tmp_path) -> None:
    source = depthwise_graph(tmp_path / "g.onnx")
    timer = cost_timer({"dense": 5e-3, "dw": 3e-3, "mul": 1e-3}, {"dense": 9e-3, "dw": 2.9e-3, "mul": 2e-3})
    chosen, record = choose_latency_exclusions(
        source, FakeQuantizer(["dense", "dw", "mul"]), [], tmp_path, timer, margin=0.03
    )
    assert chosen == [] and not any(p["kept_float"] for p in record["probes"])


def rounds_timer(rounds: dict[str, list[tuple[float, float]]]):
    """Per-round figures (int8 graph, float trial) for the probe of each group, by the group's node."""

    def measure(paths: list[Path]) -> list[list[float]]:
        trial = set(json.loads(paths[1].read_text())) - set(json.loads(paths[0].read_text()))
        pairs = rounds[next(iter(trial))]
        return [[i for i, _ in pairs], [f for _, f in pairs]]

    return measure


def test_float_must_win_every_round_to_be_kept(tmp_path) -> None:
    """ "dw" is faster in float by the median of its rounds but loses one round (noise on a shared CPU):
    it stays int8; "mul" wins all three rounds: float. The rounds are recorded."""
    source = depthwise_graph(tmp_path / "g.onnx")
    timer = rounds_timer(
        {
            "dense": [(10e-3, 12e-3)] * 3,
            "dw": [(14e-3, 11e-3), (20e-3, 15e-3), (16e-3, 19e-3)],
            "mul": [(14e-3, 12e-3), (20e-3, 17e-3), (16e-3, 13e-3)],
        }
    )
    chosen, record = choose_latency_exclusions(
        source, FakeQuantizer(["dense", "dw", "mul"]), [], tmp_path, timer
    )
    assert chosen == ["mul"]
    probes = {p["group"]: p for p in record["probes"]}
    assert probes["depthwise Conv"]["float_ms"] < probes["depthwise Conv"]["int8_ms"]  # the median says float
    assert not probes["depthwise Conv"]["kept_float"] and probes["Mul"]["kept_float"]
    assert probes["Mul"]["rounds_ms"] == {"int8": [14.0, 20.0, 16.0], "float": [12.0, 17.0, 13.0]}
    assert "every interleaved round" in record["rule"]


def test_ort_timer_gives_each_round_of_each_graph(tmp_path) -> None:
    from ssdopt.quantize.latency import ort_timer

    graph = depthwise_graph(tmp_path / "g.onnx")
    figures = ort_timer(threads=1, seconds=0.05, rounds=3)([graph, graph])
    assert len(figures) == 2 and all(len(r) == 3 and all(0 < v < 1 for v in r) for r in figures)


def test_budget_records_latency_and_accuracy_reasons(ort_budget) -> None:
    """Tiny model: its HardSwish becomes HardSigmoid + a quantized Mul; a fake timer makes the Mul
    group faster in float; a fake evaluator then forces one accuracy fallback round."""

    def timer(paths: list[Path]) -> list[float]:  # 1 ms per quantized Mul, 1 ms base
        out = []
        for path in paths:
            model = onnx.load(str(path))
            muls = {n.name for n in model.graph.node if n.op_type == "Mul"}
            out.append(1e-3 * (1 + len(muls & set(quantized_compute_nodes(model)))))
        return out

    calls: list[int] = []

    def evaluate(path: Path) -> float:
        calls.append(1)
        return 0.5 if len(calls) in (1, 3) else 0.48  # float, round 0 (2 points lost), round 1

    result = ort_budget(evaluate, layers_per_round=1, latency_timer=timer)
    assert result.within_budget and len(result.rounds) == 2
    probe = result.record["latency_probe"]
    assert [p["group"] for p in probe["probes"]] == ["Mul"] and probe["probes"][0]["kept_float"]
    latency = result.record["excluded_latency"]
    assert latency and all(n.startswith("node_") or n for n in latency)
    reasons = {row["node"]: row["reason"] for row in result.record["float_nodes"]}
    assert {reasons[n] for n in latency} == {"latency"}
    assert sorted(n for n, why in reasons.items() if why == "accuracy") == result.excluded[len(latency) :]
    assert len([why for why in reasons.values() if why == "accuracy"]) == 1
    assert any(why.startswith("auto") for why in reasons.values())
    model = onnx.load(str(result.path))
    assert not set(latency) & set(quantized_compute_nodes(model))


def test_without_a_timer_nothing_is_left_float_for_latency(tiny_export, tiny_calibration, tmp_path) -> None:
    record = quantize_int8(
        tiny_export.model,
        tmp_path / "int8.onnx",
        target="onnxruntime",
        reader=calibration_reader(tiny_calibration, 64),
        calibration=MINMAX,
    )
    assert record["excluded_latency"] == [] and record["latency_probe"] is None
    assert {row["reason"] for row in record["float_nodes"]} == {
        "auto: precision sensitive (decode op, head tail)"
    }


def test_ort_engine_keeps_an_excluded_conv_float(tiny_export, tiny_calibration, tmp_path) -> None:
    """Without disabling WeightBiasQuantization, ORT would run this excluded Conv as QLinearConv."""
    model = onnx.load(str(tiny_export.model), load_external_data=False)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    spec = BuildSpec(
        calibration=CalibrationSpec(directory=tiny_calibration, method="minmax"),
        int8_exclude=(convs[1],),  # between two quantized convolutions
    )
    engine = build_engine("onnxruntime", "int8", tiny_export.model, tmp_path, spec)
    optimised = onnx.load(str(engine.file))
    ops = [n.op_type for n in optimised.graph.node]
    assert ops.count("QLinearConv") == len(convs) - 1
    assert ops.count("Conv") == 1
    meta = engine.metadata
    assert {"node": convs[1], "reason": "requested"} in meta["quantization"]["float_nodes"]
    get_backend("onnxruntime").load(engine.path).close()
