"""Fusion report: the Conv -> BatchNormalization -> activation chains of the unfolded export, against
the layers the runtime itself reports after optimisation.

Nothing is assumed: a chain counts as fused only if the runtime's own provenance (OpenVINO
originalLayersNames, TensorRT "a + b" layer names, ONNX Runtime's fused-node naming, all carried
in LayerInfo.fused_from) puts every compute node of the chain into one runtime layer. Chains are
located in the graph the runtime consumed by their boundary tensor names (the conv's input and the
chain's output), which the exporter keeps identical in the folded and unfolded graphs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from ssdopt.backends.base import LayerInfo
from ssdopt.backends.graph import topology

ACTIVATIONS = (
    "Relu",
    "Clip",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "LeakyRelu",
    "Tanh",
    "Elu",
    "Selu",
    "PRelu",
    "Mish",
    "Softplus",
    "Gelu",
)
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Layer types that are bookkeeping, not kernels, in the runtimes' reports.
NOT_KERNELS = ("Input", "Output", "Parameter", "Result", "Const", "Constant")

Topology = list[dict[str, Any]]


def _as_topology(graph: onnx.ModelProto | Topology) -> Topology:
    return topology(graph) if isinstance(graph, onnx.ModelProto) else graph


def _data_consumers(nodes: Topology) -> dict[str, list[dict[str, Any]]]:
    """tensor -> nodes that take it as their data input (input 0, not Shape/Size). Exporters also
    feed tensors to CastLike/Shape just for their type or shape; those do not break a chain."""
    out: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        if node["inputs"] and node["op_type"] not in ("Shape", "Size"):
            out.setdefault(node["inputs"][0], []).append(node)
    return out


def find_chains(graph: onnx.ModelProto | Topology) -> list[dict[str, Any]]:
    """Conv -> BatchNormalization [-> activation] and Conv -> activation chains (intermediates with a
    single data consumer). Each: {"conv", "bn", "activation" (names or None), "activation_type",
    "input", "output"}. VGG-style nets (ssd300) have only Conv -> activation.
    """
    nodes = _as_topology(graph)
    consumers = _data_consumers(nodes)

    def single(tensor: str, op_types: tuple[str, ...]) -> dict[str, Any] | None:
        after = consumers.get(tensor, [])
        return after[0] if len(after) == 1 and after[0]["op_type"] in op_types else None

    chains = []
    for conv in nodes:
        if conv["op_type"] != "Conv":
            continue
        bn = single(conv["outputs"][0], ("BatchNormalization",))
        act = single((bn or conv)["outputs"][0], ACTIVATIONS)
        if bn is None and act is None:
            continue
        chains.append(
            {
                "conv": conv["name"],
                "bn": bn["name"] if bn else None,
                "activation": act["name"] if act else None,
                "activation_type": act["op_type"] if act else None,
                "input": conv["inputs"][0],
                "output": (act or bn or conv)["outputs"][0],
            }
        )
    return chains


def _trace(nodes: Topology, start: str, end: str, limit: int = 12) -> list[dict[str, Any]] | None:
    """Source nodes from tensor `start` to tensor `end`, walking back along data inputs; None if not found."""
    producer = {out: node for node in nodes for out in node["outputs"]}
    path: list[dict[str, Any]] = []
    tensor = end
    while tensor != start and len(path) < limit:
        node = producer.get(tensor)
        if node is None or not node["inputs"]:
            return None
        path.append(node)
        tensor = node["inputs"][0]
    return list(reversed(path)) if tensor == start else None


def _is_conv_layer(layer_type: str) -> bool:
    return "conv" in layer_type.lower()


def _chain_result(
    chain: dict[str, Any], source: Topology, covering: dict[str, list[str]], types: dict[str, str]
) -> dict[str, Any]:
    traced = _trace(source, chain["input"], chain["output"])
    result = dict(chain)
    if traced is None:
        result.update(status="not traced", source_nodes=[], runtime_layers=[])
        return result
    compute = [n for n in traced if n["op_type"] not in QDQ]
    covered = {n["name"]: list(covering.get(n["name"], [])) for n in compute}
    renamed = []
    for i, node in enumerate(compute[:-1]):
        # OpenVINO renames a conv it merged a BatchNormalization into ("Multiply_123"): its provenance
        # lists the BN and activation but not the conv. A convolution-type layer that computes the node
        # right after this conv is taken to compute the conv too, and the report says so.
        following = covered[compute[i + 1]["name"]]
        if node["op_type"] == "Conv" and not covered[node["name"]] and len(following) == 1:
            if _is_conv_layer(types.get(following[0], "")):
                covered[node["name"]] = following
                renamed.append(node["name"])
    layers: list[str] = []
    for node in compute:
        for layer in covered[node["name"]]:
            if layer not in layers:
                layers.append(layer)
    uncovered = [name for name, found in covered.items() if not found]
    if not layers:
        status = "not traced"
    elif len(layers) == 1 and not uncovered:
        status = "fused"
    else:
        status = "not fused"
    source_types = [n["op_type"] for n in compute]
    if chain["bn"] is None:
        bn = None
    elif "BatchNormalization" in source_types:
        bn = "fused by the runtime" if status == "fused" else "separate in the runtime"
    else:
        bn = "folded into the conv before the runtime (exporter)"
    rewritten = [t for t in source_types if t not in ("Conv", "BatchNormalization")]
    if chain["activation"] is None:
        act = None
    elif chain["activation_type"] in source_types:
        act = "fused by the runtime" if status == "fused" else "separate in the runtime"
    elif rewritten:
        act = f"rewritten as {' + '.join(rewritten)} before the runtime; " + (
            "fused by the runtime" if status == "fused" else "separate in the runtime"
        )
    elif any(n["op_type"] in QDQ for n in traced):
        act = "absorbed into the int8 quantization range"
    else:
        act = "removed before the runtime"
    result.update(
        status=status,
        source_nodes=[f"{n['name']} ({n['op_type']})" for n in traced],
        runtime_layers=layers,
        uncovered_source_nodes=uncovered,
        conv_by_layer_type=renamed,
        batchnorm=bn,
        activation_fate=act,
    )
    return result


def fusion_report(
    reference: onnx.ModelProto | Topology,
    source: onnx.ModelProto | Topology,
    layers: list[LayerInfo],
    reference_path: str | None = None,
) -> dict[str, Any]:
    """JSON-ready report: chains of `reference` (the unfolded export) traced through `source` (the
    graph the runtime consumed) into the runtime's `layers`."""
    ref_nodes, src_nodes = _as_topology(reference), _as_topology(source)
    covering: dict[str, list[str]] = {}
    for layer in layers:
        for name in layer.fused_from:
            covering.setdefault(name, []).append(layer.name)
    kernels = [layer for layer in layers if layer.type not in NOT_KERNELS]
    types = {layer.name: layer.type for layer in layers}
    chains = [_chain_result(chain, src_nodes, covering, types) for chain in find_chains(ref_nodes)]
    statuses = Counter(chain["status"] for chain in chains)
    return {
        "reference_graph": reference_path or "(the graph the runtime consumed)",
        "before": {
            "nodes": sum(1 for n in ref_nodes if n["op_type"] != "Constant"),
            "conv_bn_act_chains": sum(1 for c in chains if c["bn"] and c["activation"]),
            "conv_bn_chains": sum(1 for c in chains if c["bn"] and not c["activation"]),
            "conv_act_chains": sum(1 for c in chains if not c["bn"]),
            "batchnorm_nodes": sum(1 for n in ref_nodes if n["op_type"] == "BatchNormalization"),
        },
        "runtime_input": {
            "nodes": sum(1 for n in src_nodes if n["op_type"] != "Constant"),
            "batchnorm_nodes": sum(1 for n in src_nodes if n["op_type"] == "BatchNormalization"),
        },
        "after": {
            "layers": len(kernels),
            "by_type": dict(Counter(layer.type for layer in kernels).most_common()),
            "by_precision": dict(Counter(str(layer.precision) for layer in kernels).most_common()),
        },
        "chains_fused": statuses.get("fused", 0),
        "chains_not_fused": statuses.get("not fused", 0),
        "chains_not_traced": statuses.get("not traced", 0),
        "chains": chains,
    }


def fusion_table(report: dict[str, Any]) -> str:
    """Markdown: the before/after counts, then one row per chain."""
    before, after, mid = report["before"], report["after"], report["runtime_input"]
    total = len(report["chains"])
    lines = [
        "# Fusion report",
        "",
        f"Reference graph: `{report['reference_graph']}`",
        "",
        "| stage | nodes / layers | BatchNormalization |",
        "|---|---|---|",
        f"| unfolded export | {before['nodes']} nodes | {before['batchnorm_nodes']} |",
        f"| graph given to the runtime | {mid['nodes']} nodes | {mid['batchnorm_nodes']} |",
        f"| runtime after optimisation | {after['layers']} layers | - |",
        "",
        f"Conv->BN->activation chains: {before['conv_bn_act_chains']}, Conv->BN: {before['conv_bn_chains']}, "
        f"Conv->activation: {before['conv_act_chains']}; "
        f"fused into one runtime layer: **{report['chains_fused']} of {total}** "
        f"(not fused {report['chains_not_fused']}, not traced {report['chains_not_traced']}).",
        "",
        "Runtime layer types: " + ", ".join(f"{k} {v}" for k, v in after["by_type"].items()),
        "",
        "| chain (conv / bn / activation) | status | runtime layer(s) | batchnorm | activation |",
        "|---|---|---|---|---|",
    ]
    for chain in report["chains"]:
        names = " / ".join(str(x or "-") for x in (chain["conv"], chain["bn"], chain["activation"]))
        layers = ", ".join(f"`{name}`" for name in chain["runtime_layers"]) or "-"
        lines.append(
            f"| {names} | {chain['status']} | {layers} | {chain.get('batchnorm') or '-'} | "
            f"{chain.get('activation_fate') or '-'} |"
        )
    return "\n".join(lines) + "\n"
