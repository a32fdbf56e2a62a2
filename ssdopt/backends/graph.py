"""Small read-only questions about an ONNX graph that every backend asks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx

from ssdopt.errors import SsdoptError

NMS_DOMAIN = "ssdopt"
NMS_OP = "SSDDecodeNMS"


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over several files (name + bytes each, in the given order): e.g. OpenVINO .xml + .bin."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def load_topology(path: Path | str) -> onnx.ModelProto:
    """The graph without external weight files (enough for names, types and shapes)."""
    path = Path(path)
    if not path.is_file():
        raise SsdoptError(path, "an ONNX file", "export the model first (`ssdopt export`)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise SsdoptError(path, f"a readable ONNX model ({exc})", "re-export the model") from exc


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
