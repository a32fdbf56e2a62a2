"""Fusion reports: chains found in the unfolded export, fused-or-not taken from the runtime's own report."""

from __future__ import annotations

import json

import onnx
import openvino as ov
import pytest

from ssdopt.backends import LayerInfo
from ssdopt.build import build_engine
from ssdopt.fusion import find_chains, fusion_report, fusion_table


@pytest.fixture(scope="module")
def export(tiny_export):
    return tiny_export


def test_chains_of_the_unfolded_export(export) -> None:
    chains = find_chains(onnx.load(str(export.unfolded)))
    assert [c["activation_type"] for c in chains] == ["Clip", "HardSwish", "Clip"]
    assert all(c["bn"] and c["conv"] for c in chains)
    folded = find_chains(onnx.load(str(export.model)))  # the exporter folded every BatchNormalization
    assert [(c["bn"], c["activation_type"]) for c in folded] == [
        (None, "Clip"),
        (None, "HardSwish"),
        (None, "Clip"),
    ]
    assert [c["output"] for c in folded] == [c["output"] for c in chains]  # same boundary tensor names


def test_onnxruntime_report_counts_come_from_the_optimised_graph(export, tmp_path) -> None:
    engine = build_engine("onnxruntime", "fp32", export.model, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    optimised = onnx.load(str(engine.file))
    unfolded = onnx.load(str(export.unfolded))
    assert report["after"]["layers"] == len(optimised.graph.node)
    assert report["before"]["nodes"] == sum(n.op_type != "Constant" for n in unfolded.graph.node)
    assert report["before"]["batchnorm_nodes"] == 3 and report["runtime_input"]["batchnorm_nodes"] == 0
    assert report["chains_fused"] == 3
    activations = [n for n in optimised.graph.node if any(a.name == "activation" for a in n.attribute)]
    assert len(activations) == 3  # independently: three convs carry a fused activation in ORT's graph
    table = (engine.path / "fusion.md").read_text()
    assert f"| {report['after']['layers']} layers |" in table and "3 of 3" in table


def test_openvino_report_counts_come_from_the_runtime_model(export, tmp_path) -> None:
    engine = build_engine("openvino", "fp32", export.model, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    compiled = ov.Core().compile_model(
        str(engine.path / "engine.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    kinds = [
        op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
    ]
    assert report["after"]["layers"] == sum(k not in ("Const", "Input", "Output") for k in kinds)
    assert report["chains_fused"] == 3
    assert all(c["activation_fate"] == "fused by the runtime" for c in report["chains"])


def test_openvino_fuses_the_unfolded_graph_and_the_report_says_so(export, tmp_path) -> None:
    engine = build_engine("openvino", "fp32", export.unfolded, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    assert report["runtime_input"]["batchnorm_nodes"] == 3
    assert report["chains_fused"] == 3
    assert all(c["batchnorm"] == "fused by the runtime" for c in report["chains"])
    assert all(c["conv_by_layer_type"] == [c["conv"]] for c in report["chains"])  # OpenVINO renamed the convs


def test_report_follows_the_runtime_on_the_unfolded_graph(export, tmp_path) -> None:
    """Give ORT the unfolded graph itself: whatever it does with BatchNormalization, the report agrees."""
    engine = build_engine("onnxruntime", "fp32", export.unfolded, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    bn_left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(engine.file)).graph.node)
    assert report["runtime_input"]["batchnorm_nodes"] == 3
    if bn_left:
        assert report["chains_fused"] < 3
        assert any(c["batchnorm"] == "separate in the runtime" for c in report["chains"])
    else:
        assert all(
            c["batchnorm"] == "fused by the runtime" for c in report["chains"] if c["status"] == "fused"
        )


def _chain_graph() -> list[dict]:
    return [
        {"name": "conv", "op_type": "Conv", "domain": "", "inputs": ["x", "w"], "outputs": ["c"]},
        {
            "name": "bn",
            "op_type": "BatchNormalization",
            "domain": "",
            "inputs": ["c", "s", "b", "m", "v"],
            "outputs": ["n"],
        },
        {"name": "relu", "op_type": "Relu", "domain": "", "inputs": ["n"], "outputs": ["y"]},
    ]


@pytest.mark.parametrize(
    ("layers", "status"),
    [
        ([LayerInfo("k", "Convolution", "f32", ("conv", "bn", "relu"))], "fused"),
        (
            [
                LayerInfo("k1", "Convolution", "f32", ("conv", "bn")),
                LayerInfo("k2", "Eltwise", "f32", ("relu",)),
            ],
            "not fused",
        ),
        ([LayerInfo("k", "Convolution", "f32", ("conv", "bn"))], "not fused"),  # relu unaccounted for
        ([LayerInfo("k", "Convolution", "f32", ("something_else",))], "not traced"),
        (
            [LayerInfo("Multiply_7", "Convolution", "f32", ("Multiply_7", "bn", "relu"))],
            "fused",
        ),  # OV renamed
        ([LayerInfo("Multiply_7", "Eltwise", "f32", ("Multiply_7", "bn", "relu"))], "not fused"),
    ],
)
def test_chain_status_is_decided_by_the_layers_provenance(layers, status) -> None:
    graph = _chain_graph()
    report = fusion_report(graph, graph, layers)
    assert [c["status"] for c in report["chains"]] == [status]
    assert report["after"]["layers"] == len(layers)
    assert status in fusion_table(report)
