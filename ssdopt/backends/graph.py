"""Small read-only questions about an ONNX graph that every backend asks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from ssdopt.errors import SsdoptError

NMS_DOMAIN = "ssdopt"
NMS_OP = "SSDDecodeNMS"


# Limits for ONNX files from outside (configurable by environment; the defaults pass any SSD export).
MAX_ONNX_MB_ENV = "SSDOPT_MAX_ONNX_MB"
MAX_ONNX_NODES_ENV = "SSDOPT_MAX_ONNX_NODES"
DEFAULT_MAX_ONNX_MB = 2048  # protobuf's own ceiling for one file
DEFAULT_MAX_ONNX_NODES = 100_000  # ssd300 int8 Q/DQ has ~1,000
MIN_OPSET = 13  # per-channel Q/DQ and every op the exporter emits


def _limit(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SsdoptError(name, f"a positive number, got {text!r}", f"fix or unset {name}")
    return value


def onnx_limits() -> tuple[int, int]:
    """(max file bytes, max node count) for an ONNX file, from SSDOPT_MAX_ONNX_MB / _NODES."""
    megabytes = _limit(MAX_ONNX_MB_ENV, DEFAULT_MAX_ONNX_MB)
    return int(megabytes * 2**20), int(_limit(MAX_ONNX_NODES_ENV, DEFAULT_MAX_ONNX_NODES))


def _count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of `graph` and of every subgraph (If/Loop/Scan bodies)."""
    total = len(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            total += sum(_count_nodes(g) for g in ([attribute.g] if attribute.HasField("g") else []))
            total += sum(_count_nodes(g) for g in attribute.graphs)
    return total


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    newest = onnx.defs.onnx_opset_version()
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or not MIN_OPSET <= version <= newest:
        raise SsdoptError(
            path,
            f"default-domain opset {MIN_OPSET}..{newest} (what this onnx {onnx.__version__} knows), "
            f"got {version}",
            "re-export with `ssdopt export --opset 18`",
        )


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external weight file exists inside the model's folder and is long enough."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    base = path.parent.resolve()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        data = (base / info.location).resolve()
        fix = "keep the model's .data file beside it, or re-export with external_data=False"
        if not info.location or not data.is_relative_to(base):
            raise SsdoptError(
                path, f"external data inside {base} for '{tensor.name}', got {info.location!r}", fix
            )
        if not data.is_file():
            raise SsdoptError(data, f"the external-data file {path.name} needs for '{tensor.name}'", fix)
        end = (info.offset or 0) + (info.length or 0)
        if data.stat().st_size < end:
            raise SsdoptError(
                data, f"at least {end} bytes for '{tensor.name}', got {data.stat().st_size}", fix
            )


def load_topology(path: Path | str) -> onnx.ModelProto:
    """The graph without external weight files (enough for names, types and shapes), after checks
    that make a file from outside safe to hand to a runtime: size and node limits (onnx_limits),
    a known opset, external-data files present and inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise SsdoptError(path, "an ONNX file", "export the model first (`ssdopt export`)")
    max_bytes, max_nodes = onnx_limits()
    size = path.stat().st_size
    if size > max_bytes:
        raise SsdoptError(
            path,
            f"an ONNX file of at most {max_bytes / 2**20:.3g} MB ({MAX_ONNX_MB_ENV}), "
            f"got {size / 2**20:.3g} MB",
            f"raise {MAX_ONNX_MB_ENV} if you trust this file",
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise SsdoptError(path, f"a readable ONNX model ({exc})", "re-export the model") from exc
    nodes = _count_nodes(model.graph)
    if nodes > max_nodes:
        raise SsdoptError(
            path,
            f"at most {max_nodes} nodes ({MAX_ONNX_NODES_ENV}), got {nodes}",
            f"raise {MAX_ONNX_NODES_ENV} if you trust this file",
        )
    _check_opset(model, path)
    _check_external_data(model, path)
    return model


def has_custom_nms(model: onnx.ModelProto) -> bool:
    """True when the graph holds a node of domain `ssdopt` (SSDDecodeNMS): the runtime must register it."""
    return any(node.domain == NMS_DOMAIN for node in model.graph.node)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    dims: list[int | str] = []
    for dim in value.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


def input_spec(model: onnx.ModelProto) -> dict[str, Any]:
    """The single image input: {"name", "shape" (dims, str for dynamic), "dtype"}."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise SsdoptError(
            "ONNX graph inputs",
            f"exactly one image input, found {[v.name for v in inputs]}",
            "re-export the model",
        )
    value = inputs[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return {"name": value.name, "shape": _dims(value), "dtype": dtype}


def output_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """[{"name", "shape", "dtype"}] of the graph outputs."""
    return [
        {
            "name": value.name,
            "shape": _dims(value),
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
        }
        for value in model.graph.output
    ]


def topology(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Nodes as {"name", "op_type", "domain", "inputs", "outputs"}: what fusion reports trace through."""
    return [
        {
            "name": node.name,
            "op_type": node.op_type,
            "domain": node.domain,
            "inputs": list(node.input),
            "outputs": list(node.output),
        }
        for node in model.graph.node
    ]
