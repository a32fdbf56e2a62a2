"""SSDDecodeNMS in ONNX Runtime: an onnxruntime-extensions Python custom op calling the C++ CPU kernel.

The ORT wheel ships no C headers, so the op is an onnxruntime-extensions "PyOp" whose compute calls
``ssdopt_nms_decode_cpu`` of ``libssdopt_nms_cpu.so`` through ctypes (``ssdopt.ops.library``).

Two limits of onnxruntime-extensions PyOps (0.15), both measured, shape this module:
  * a PyOp always lives in the domain ``ai.onnx.contrib`` (``onnx_op`` takes no domain; a node in domain
    ``ssdopt`` fails with "ssdopt:SSDDecodeNMS(-1) is not a registered function/op");
  * a PyOp attribute can only be a scalar int64, float or string, and every declared attribute must be
    present on the node; box_weights and image_size are lists.
So a model is rewritten when it is loaded (``ort_model_from_onnx``): each ``ssdopt::SSDDecodeNMS`` node
becomes ``ai.onnx.contrib::SSDDecodeNMS`` with one string attribute ``attributes`` holding every attribute
(defaults filled in) as JSON, and a float16 (or untyped) box_deltas / class_logits input gets a Cast to
float32, which is exact; the kernel then runs in float32. The ONNX file on disk keeps the portable ``ssdopt``
form that OpenVINO and TensorRT read.

A third trap: an exception raised inside a PyOp's compute terminates the whole process (std::terminate on
pybind11::error_already_set; measured with onnxruntime-extensions 0.15.2). So everything checkable is checked
when the model is rewritten (attributes, and the kernel's own validation against A and C where the graph
tells them), and compute never raises: a run the kernel refuses returns num_detections = -1 for every image
(boxes/scores zeros, labels -1), logs the reason, and ``raise_for_failed_run(num_detections)`` turns it into
an SsdoptError; ``run_checked`` does both.

    session = session_from_onnx("model.onnx")                      # or, by hand:
    model = ort_model_from_onnx("model.onnx")
    session = onnxruntime.InferenceSession(model.SerializeToString(), session_options_with_nms())
    outputs = run_checked(session, {"images": batch})               # raises SsdoptError on a refused run
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper

from ssdopt.errors import SsdoptError
from ssdopt.ops.library import decode_nms_numpy, load_cpu_library
from ssdopt.ops.reference import DecodeNmsAttributes

OP_TYPE = "SSDDecodeNMS"
ONNX_DOMAIN = "ssdopt"
ORT_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions gives Python ops
ATTRIBUTES_KEY = "attributes"
# ONNX attribute name -> DecodeNmsAttributes field, for the attributes that map one to one.
SCALAR_ATTRIBUTES = {
    "score_threshold": "score_threshold",
    "iou_threshold": "iou_threshold",
    "pre_nms_top_k": "pre_nms_top_k",
    "max_detections": "max_detections",
    "background_class": "background_class",
}
ONNX_ATTRIBUTES = frozenset(
    {*SCALAR_ATTRIBUTES, "box_weights", "score_activation", "class_agnostic", "image_size"}
)
# Read by TensorRT's ONNX parser to find the plugin; meaningless to the kernel.
PLUGIN_LOOKUP_ATTRIBUTES = frozenset({"plugin_version", "plugin_namespace"})


def attributes_from_node(node: onnx.NodeProto) -> DecodeNmsAttributes:
    """The kernel attributes of an SSDDecodeNMS node (DESIGN.md names); absent ones take the defaults."""
    where = f"ONNX node {node.name or '<unnamed>'} ({node.domain}::{node.op_type})"
    onnx_values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = set(onnx_values) - ONNX_ATTRIBUTES - PLUGIN_LOOKUP_ATTRIBUTES
    if unknown:
        raise SsdoptError(
            f"{where}: attributes {sorted(unknown)}",
            f"only {sorted(ONNX_ATTRIBUTES)}",
            "export the node with ssdopt.ops.onnx_node (DESIGN.md, section SSDDecodeNMS)",
        )
    values: dict[str, object] = {
        field: onnx_values[name] for name, field in SCALAR_ATTRIBUTES.items() if name in onnx_values
    }
    if "box_weights" in onnx_values:
        weights = tuple(float(w) for w in onnx_values["box_weights"])
        if len(weights) != 4:
            raise SsdoptError(
                f"{where}: attribute box_weights", "4 floats (wx, wy, ww, wh)", "fix the export"
            )
        values["box_weights"] = weights
    if "score_activation" in onnx_values:
        activation = onnx_values["score_activation"]
        activation = activation.decode() if isinstance(activation, bytes) else activation
        if activation not in ("softmax", "sigmoid"):
            raise SsdoptError(
                f"{where}: attribute score_activation", '"softmax" or "sigmoid"', "fix the export"
            )
        values["softmax"] = activation == "softmax"
    if "class_agnostic" in onnx_values:
        values["class_agnostic"] = bool(onnx_values["class_agnostic"])
    if "image_size" in onnx_values:
        size = list(onnx_values["image_size"])
        if len(size) != 2:
            raise SsdoptError(f"{where}: attribute image_size", "2 ints [H, W]", "fix the export")
        values["image_height"], values["image_width"] = int(size[0]), int(size[1])
    return DecodeNmsAttributes(**values)  # type: ignore[arg-type]


_log = logging.getLogger(__name__)
_failure_lock = threading.Lock()
_last_failure = ""


@lru_cache(maxsize=64)
def _kernel_kwargs(attributes_json: str) -> dict[str, object]:
    values = json.loads(attributes_json)
    values["box_weights"] = tuple(values["box_weights"])
    return values


def _failed_outputs(box_deltas: np.ndarray, max_detections: int, error: Exception) -> tuple[np.ndarray, ...]:
    """Outputs of a refused run: num_detections -1 per image, padding elsewhere (an exception would abort)."""
    global _last_failure
    message = str(error)
    with _failure_lock:
        _last_failure = message
    _log.error("SSDDecodeNMS refused a run: %s", message)
    batch = int(box_deltas.shape[0]) if box_deltas.ndim >= 1 else 0
    k = max(int(max_detections), 0)
    return (
        np.full((batch,), -1, np.int32),
        np.zeros((batch, k, 4), np.float32),
        np.zeros((batch, k), np.float32),
        np.full((batch, k), -1, np.int32),
    )


def raise_for_failed_run(num_detections: np.ndarray) -> None:
    """SsdoptError when a run's num_detections carries the failure mark (-1) of a refused run."""
    if np.any(np.asarray(num_detections) < 0):
        with _failure_lock:
            reason = _last_failure or "unknown (see the log of ssdopt.ops.ort)"
        raise SsdoptError(
            "SSDDecodeNMS in ONNX Runtime", "inputs the kernel accepts", f"fix the input: {reason}"
        )


def run_checked(
    session: onnxruntime.InferenceSession,
    feeds: dict[str, np.ndarray],
    output_names: list[str] | None = None,
    num_detections: str = "num_detections",
) -> list[np.ndarray]:
    """session.run, then raise_for_failed_run on the output named `num_detections` (when it is fetched)."""
    names = output_names or [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    if num_detections in names:
        raise_for_failed_run(outputs[names.index(num_detections)])
    return outputs


def _register_python_op() -> None:
    """Declare ai.onnx.contrib::SSDDecodeNMS to onnxruntime-extensions (once, at import)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
        outputs=[
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_int32,
        ],
        attrs={ATTRIBUTES_KEY: PyCustomOpDef.dt_string},
    )
    def ssd_decode_nms(
        box_deltas: np.ndarray, class_logits: np.ndarray, anchors: np.ndarray, **attributes: str
    ) -> tuple[np.ndarray, ...]:
        max_detections = 0
        try:  # nothing may escape: a Python exception here terminates the process (module docstring)
            kwargs = _kernel_kwargs(attributes[ATTRIBUTES_KEY])
            max_detections = int(kwargs["max_detections"])  # type: ignore[call-overload]
            return decode_nms_numpy(box_deltas, class_logits, anchors, **kwargs)
        except Exception as error:  # noqa: BLE001
            return _failed_outputs(box_deltas, max_detections, error)


_register_python_op()


def session_options_with_nms(options: onnxruntime.SessionOptions | None = None) -> onnxruntime.SessionOptions:
    """Session options that can run SSDDecodeNMS: registers onnxruntime-extensions' custom-op library.

    Loads the CPU kernel now (building it if needed), so a missing library fails here with a fix rather
    than inside a run. Use with a model from ``ort_model_from_onnx``.
    """
    from onnxruntime_extensions import get_library_path

    load_cpu_library()
    options = options or onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What shape inference tells about a tensor: element type (0 = unknown), dims (None = unknown)."""

    elem_type: int = 0
    dims: tuple[int | None, ...] | None = None


def _tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """TensorInfo of every tensor ONNX shape inference can describe."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - only an optimisation: unknown types get a Cast, unknown dims a later check
        inferred = model
    graph = inferred.graph
    infos = {init.name: TensorInfo(init.data_type, tuple(init.dims)) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        dims = (
            tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            if tensor.HasField("shape")
            else None
        )
        infos.setdefault(value.name, TensorInfo(tensor.elem_type, dims))
    return infos


def _check_with_kernel(
    where: str, attributes: DecodeNmsAttributes, deltas: TensorInfo, logits: TensorInfo, anchors: TensorInfo
) -> None:
    """Run the kernel's own validation now (batch 0), with A and C where the graph tells them."""
    for name, info, rank in (("box_deltas", deltas, 3), ("class_logits", logits, 3), ("anchors", anchors, 2)):
        if info.dims is not None and len(info.dims) != rank:
            raise SsdoptError(
                f"{where}: input {name}",
                f"rank {rank} (box_deltas [B,A,4], class_logits [B,A,C], anchors [A,4]), got {info.dims}",
                "feed the SSD head outputs unflattened",
            )
    num_anchors = anchors.dims[0] if anchors.dims else None
    for info in (deltas, logits):
        if info.dims is not None and len(info.dims) == 3 and info.dims[1] is not None:
            if num_anchors is not None and info.dims[1] != num_anchors:
                raise SsdoptError(
                    where,
                    f"box_deltas, class_logits and anchors with one anchor count A; got "
                    f"{deltas.dims}, {logits.dims}, {anchors.dims}",
                    "export anchors for this input size",
                )
            num_anchors = info.dims[1]
    num_classes = logits.dims[2] if logits.dims is not None and len(logits.dims) == 3 else None
    classes = num_classes if num_classes is not None else max(attributes.background_class + 1, 1)
    anchors_count = num_anchors or 1
    try:
        decode_nms_numpy(
            np.zeros((0, anchors_count, 4), np.float32),
            np.zeros((0, anchors_count, classes), np.float32),
            np.zeros((anchors_count, 4), np.float32),
            **dataclasses.asdict(attributes),
        )
    except SsdoptError as error:
        raise SsdoptError(
            where,
            f"attributes the kernel accepts with A={num_anchors}, C={num_classes}",
            f"fix the export ({error.expected})",
        ) from error


def _ort_node(node: onnx.NodeProto, infos: dict[str, TensorInfo], index: int) -> list[onnx.NodeProto]:
    """The nodes replacing one ssdopt::SSDDecodeNMS node: Casts to float32 where needed, then the PyOp."""
    where = f"ONNX node {node.name or '<unnamed>'} ({node.domain}::{node.op_type})"
    attributes = attributes_from_node(node)
    if len(node.input) != 3 or len(node.output) != 4:
        raise SsdoptError(
            where, "3 inputs and 4 outputs (DESIGN.md)", "export the node with ssdopt.ops.onnx_node"
        )
    _check_with_kernel(where, attributes, *(infos.get(name, TensorInfo()) for name in node.input))
    inputs = list(node.input)
    nodes = []
    for i in range(3):  # box_deltas, class_logits, anchors: the PyOp takes float32 only
        if infos.get(inputs[i], TensorInfo()).elem_type != TensorProto.FLOAT:
            as_float = f"{inputs[i]}__ssdopt_float32_{index}"
            nodes.append(
                helper.make_node(
                    "Cast",
                    [inputs[i]],
                    [as_float],
                    to=TensorProto.FLOAT,
                    name=f"{node.name or OP_TYPE}_cast{i}_{index}",
                )
            )
            inputs[i] = as_float
    payload = json.dumps(dataclasses.asdict(attributes), sort_keys=True)
    nodes.append(
        helper.make_node(
            OP_TYPE, inputs, list(node.output), name=node.name, domain=ORT_DOMAIN, **{ATTRIBUTES_KEY: payload}
        )
    )
    return nodes


def ort_model_from_onnx(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """Rewrite each ssdopt::SSDDecodeNMS node into the form onnxruntime-extensions runs (module docstring).

    Returns a new ModelProto (the input is not changed); SsdoptError when the model has no such node.
    """
    source = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(source)
    graph = rewritten.graph
    infos = _tensor_infos(rewritten)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == OP_TYPE and node.domain == ONNX_DOMAIN:
            nodes.extend(_ort_node(node, infos, count))
            count += 1
        else:
            nodes.append(node)
    if count == 0:
        raise SsdoptError(
            str(model) if isinstance(model, (str, Path)) else "ONNX model",
            f"a {ONNX_DOMAIN}::{OP_TYPE} node",
            "export the detector with the fused post-processing",
        )
    del graph.node[:]
    graph.node.extend(nodes)
    opsets = [o for o in rewritten.opset_import if o.domain not in (ONNX_DOMAIN, ORT_DOMAIN)]
    del rewritten.opset_import[:]
    rewritten.opset_import.extend([*opsets, helper.make_opsetid(ORT_DOMAIN, 1)])
    return rewritten


def session_from_onnx(
    model: onnx.ModelProto | str | Path,
    options: onnxruntime.SessionOptions | None = None,
    providers: list[str] | None = None,
) -> onnxruntime.InferenceSession:
    """An InferenceSession for an ONNX model with SSDDecodeNMS (rewritten as in the module docstring)."""
    rewritten = ort_model_from_onnx(model)
    return onnxruntime.InferenceSession(
        rewritten.SerializeToString(),
        session_options_with_nms(options),
        providers=providers or ["CPUExecutionProvider"],
    )
