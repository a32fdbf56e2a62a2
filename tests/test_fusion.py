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


def _invariants(report: dict, chains: list[dict]) -> None:
    """What holds whatever the runtime did on this CPU: every chain of the export is reported once, the
    status counts add up, and no runtime layer is claimed by two fused chains."""
    assert [c["conv"] for c in report["chains"]] == [c["conv"] for c in chains]
    total = report["chains_fused"] + report["chains_not_fused"] + report["chains_not_traced"]
    assert total == len(chains)
    fused_layers = [name for c in report["chains"] if c["status"] == "fused" for name in c["runtime_layers"]]
    assert len(fused_layers) == len(set(fused_layers)) == report["chains_fused"]


def test_onnxruntime_report_counts_come_from_the_optimised_graph(export, tmp_path) -> None:
    """The expectation is read off ORT's optimised graph on this machine, not a count seen on one CPU:
    ORT's NCHWc transformer (AVX-512) leaves some activations as separate nodes that AVX2 fuses."""
    engine = build_engine("onnxruntime", "fp32", export.model, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    optimised = onnx.load(str(engine.file))
    unfolded = onnx.load(str(export.unfolded))
    chains = find_chains(unfolded)
    assert report["after"]["layers"] == len(optimised.graph.node)
    assert report["before"]["nodes"] == sum(n.op_type != "Constant" for n in unfolded.graph.node)
    assert report["before"]["batchnorm_nodes"] == sum(
        n.op_type == "BatchNormalization" for n in unfolded.graph.node
    )
    assert report["runtime_input"]["batchnorm_nodes"] == 0  # every BatchNormalization folded by the exporter
    assert not any(n.op_type == "BatchNormalization" for n in optimised.graph.node)
    _invariants(report, chains)
    # independently of the report's tracing: a chain is fused when ORT put its activation into a conv
    # node (`activation` attribute); the head convs have no activation, so each such node is one chain
    with_activation = [
        n
        for n in optimised.graph.node
        if "Conv" in n.op_type and any(a.name == "activation" for a in n.attribute)
    ]
    assert report["chains_fused"] == len(with_activation)
    for chain in report["chains"]:
        if chain["status"] != "fused":  # the activation is a node of its own in ORT's graph
            assert chain["activation_fate"].endswith("separate in the runtime"), chain
    table = (engine.path / "fusion.md").read_text()
    assert f"| {report['after']['layers']} layers |" in table
    assert f"{report['chains_fused']} of {len(chains)}" in table


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
    _invariants(report, find_chains(onnx.load(str(export.unfolded))))
    # OpenVINO's CPU graph optimiser merges conv+activation before it picks ISA-specific kernels: the
    # behaviour asserted is "every chain fused", and the count follows from the export, not a constant
    assert report["chains_fused"] == len(report["chains"])
    assert all(c["activation_fate"] == "fused by the runtime" for c in report["chains"])


def test_openvino_fuses_the_unfolded_graph_and_the_report_says_so(export, tmp_path) -> None:
    engine = build_engine("openvino", "fp32", export.unfolded, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    unfolded = onnx.load(str(export.unfolded))
    assert report["runtime_input"]["batchnorm_nodes"] == sum(
        n.op_type == "BatchNormalization" for n in unfolded.graph.node
    )
    _invariants(report, find_chains(unfolded))
    assert report["chains_fused"] == len(report["chains"])
    assert all(c["batchnorm"] == "fused by the runtime" for c in report["chains"])
    assert all(c["conv_by_layer_type"] == [c["conv"]] for c in report["chains"])  # OpenVINO renamed the convs


def test_report_follows_the_runtime_on_the_unfolded_graph(export, tmp_path) -> None:
    """Give ORT the unfolded graph itself: whatever it does with BatchNormalization, the report agrees."""
    engine = build_engine("onnxruntime", "fp32", export.unfolded, tmp_path)
    report = json.loads((engine.path / "fusion.json").read_text())
    bn_left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(engine.file)).graph.node)
    unfolded = onnx.load(str(export.unfolded))
    assert report["runtime_input"]["batchnorm_nodes"] == sum(
        n.op_type == "BatchNormalization" for n in unfolded.graph.node
    )
    _invariants(report, find_chains(unfolded))
    if bn_left:
        assert report["chains_fused"] < len(report["chains"])
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
