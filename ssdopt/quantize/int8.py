"""INT8 post-training quantization into an explicit Q/DQ ONNX graph, shaped for its target runtime.

- onnxruntime / openvino: ONNX Runtime static quantization, QDQ, uint8 asymmetric activations,
  int8 symmetric per-channel weights. On x86 without VNNI, weights use 7 bits (reduce_range): both
  runtimes' u8 x s8 kernels there (vpmaddubsw) saturate int16 pair sums. ORT recommends it; NNCF
  does the same for OpenVINO ("overflow fix"). Measured on the tiny test model, AVX2 CPU: OpenVINO
  int8 box-delta SNR 12.7 dB with 8-bit weights, > 15 dB with 7-bit.
- tensorrt: NVIDIA ModelOpt's ONNX PTQ (TensorRT's Q/DQ placement rules), only with the `tensorrt` extra.

Measured (random-weight ssdlite320 with BatchNorm statistics re-estimated, 32 calibration images,
int8 vs fp32 head-output SNR): minmax 6.6 dB, percentile 99.999 4.8 dB, entropy 1.1 dB; 7-bit vs
8-bit weights on this AVX2 CPU: 6.7 vs 2.5 dB (ORT), 7.1 vs 3.1 dB (OpenVINO). Random weights say
little about mAP: choose the method with the reference model's val mAP (quantize_with_budget).

Calibration is run here, not inside `quantize_static`, so that the calibrator gets the bins that
make entropy/percentile real (ORT's quantize_static builds an entropy calibrator with 128 bins:
one candidate threshold, i.e. min-max) and is fed in bounded chunks. The ranges go to
`quantize_static` through its calibration cache.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ssdopt.errors import SsdoptError
from ssdopt.quantize.budget import budget_rounds, checked_map
from ssdopt.quantize.calibration_reader import CalibrationSpec, ImageBatches
from ssdopt.quantize.decode_node import detach_file, reattach_decode, reattach_file
from ssdopt.quantize.entropy import entropy_threshold
from ssdopt.quantize.latency import Timer, choose_latency_exclusions

TARGETS = ("onnxruntime", "openvino", "tensorrt")
NMS_DOMAIN = "ssdopt"
# Ops between the last convolutions and the outputs that only move or normalise data; the
# Softmax/Sigmoid/Concat among them stay float (scores and concatenated heads are precision sensitive).
_TAIL_PASS_THROUGH = (
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Cast",
    "Concat",
    "Softmax",
    "Sigmoid",
)
_TAIL_EXCLUDED = ("Concat", "Softmax", "Sigmoid")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Run int8 (QLinearAdd, QLinearMul) only when every input is dequantized: an excluded Mul of a
# HardSwish reads one Q/DQ'd input and the float HardSigmoid, and stays float.
BINARY_OPS = ("Add", "Mul")
CALIBRATION_CHUNK = 16  # images per calibrator call: bounds memory, results are merged across calls


def _quiet() -> contextlib.AbstractContextManager:
    """Silence ORT's calibration prints (tensor counts, per-tensor progress)."""
    return contextlib.redirect_stdout(io.StringIO())


def tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Softmax/Sigmoid/Concat nodes that reach a graph output (or the SSDDecodeNMS node) through
    data-movement ops only, i.e. the head's final concatenation and score activation."""
    producer = {out: node for node in model.graph.node for out in node.output}
    starts = [o.name for o in model.graph.output]
    starts += [name for node in model.graph.node if node.domain == NMS_DOMAIN for name in node.input]
    found: list[str] = []
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen or node.op_type not in _TAIL_PASS_THROUGH:
            continue
        seen.add(node.name)
        if node.op_type in _TAIL_EXCLUDED:
            found.append(node.name)
        stack.extend(node.input if node.op_type == "Concat" else node.input[:1])
    return sorted(found)


def default_exclusions(model: onnx.ModelProto) -> list[str]:
    """Nodes never quantized: SSDDecodeNMS (domain ssdopt) and the head's tail (see tail_nodes)."""
    return sorted({n.name for n in model.graph.node if n.domain == NMS_DOMAIN} | set(tail_nodes(model)))


def cpu_lacks_vnni() -> bool:
    """x86 CPU without an 8-bit dot-product instruction (VNNI/AMX): ORT's u8s8 kernels may saturate."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    flags = next(
        (set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set()
    )
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def target_settings(target: str) -> dict[str, Any]:
    """Q/DQ data types and options per target runtime (see module docstring)."""
    from onnxruntime.quantization import QuantType

    if target not in TARGETS:
        raise SsdoptError(
            f"int8 target '{target}'", f"one of {', '.join(TARGETS)}", "pick the backend you build for"
        )
    return {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "reduce_range": target in ("onnxruntime", "openvino") and cpu_lacks_vnni(),
        "extra_options": {"WeightSymmetric": True, "ActivationSymmetric": False},
    }


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibrate(model_path: Path, reader: ImageBatches, calibration: CalibrationSpec, cache: Path) -> Path:
    """Compute activation ranges on the calibration images; write ORT's calibration cache to `cache`.

    Entropy and percentile get `calibration.num_bins` histogram bins (>= 2048 for entropy).
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    extra: dict[str, Any] = {}
    if calibration.method == "entropy":
        extra = {"num_bins": calibration.num_bins, "num_quantized_bins": calibration.num_quantized_bins}
    elif calibration.method == "percentile":
        extra = {"num_bins": calibration.num_bins, "percentile": calibration.percentile, "symmetric": False}
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".calibrate-") as work, _quiet():
        calibrator = create_calibrator(
            Path(model_path),
            _op_types(),
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=_method(calibration.method),
            extra_options=extra,
        )
        fed = 0
        for chunk in reader.chunks(CALIBRATION_CHUNK):
            calibrator.collect_data(chunk)
            fed += 1
        if fed == 0:
            raise SsdoptError("calibration set", "at least one image", "check build.calibration.directory")
        if calibration.method == "entropy":  # same algorithm, without ORT's per-bin Python loops
            calibrator.collector.get_entropy_threshold = entropy_threshold
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name from its op type and first output (so it can be excluded,
    ranked and recorded); returns how many were named."""
    taken = {n.name for n in model.graph.node}
    named = 0
    for node in model.graph.node:
        if node.name:
            continue
        base = f"{node.op_type}_{node.output[0] if node.output else 'node'}"
        name, index = base, 1
        while name in taken:
            name, index = f"{base}_{index}", index + 1
        node.name = name
        taken.add(name)
        named += 1
    return named


def preprocess(onnx_path: Path, out: Path) -> tuple[Path, str | None]:
    """ORT's quant_pre_process (shape inference + basic graph cleanup) -> (path to use, error or None).

    It fails on some dynamo-exported graphs (DESIGN.md: ssd300); then the original graph is used.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(onnx_path), str(out), skip_symbolic_shape=False)
        model = onnx.load(str(out))
        if name_unnamed_nodes(model):  # inlined HardSwish -> unnamed HardSigmoid + Mul: name them
            onnx.save(model, str(out))
        return out, None
    except Exception as exc:  # ORT raises anything from symbolic shape inference
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        return Path(onnx_path), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def quantize_int8(
    onnx_path: Path | str,
    out: Path | str,
    *,
    target: str,
    reader: ImageBatches,
    calibration: CalibrationSpec | None = None,
    per_channel: bool = True,
    exclude: tuple[str, ...] | list[str] = (),
    preprocess_graph: bool = True,
    calibration_cache: Path | None = None,
    latency_timer: Timer | None = None,
    exclude_reasons: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write the Q/DQ int8 graph of `onnx_path` to `out` (atomically); return what was done.

    `latency_timer` (onnxruntime target): first keep in float the node groups measured faster in float
    (ssdopt.quantize.latency). `exclude_reasons`: why each `exclude` node is float (default "requested");
    the record's `float_nodes` lists every node kept float with its reason.

    `exclude`: extra node names kept in float (on top of default_exclusions). `calibration_cache`:
    reuse ranges computed earlier on the same float graph (the accuracy fallback's rounds). An
    SSDDecodeNMS node is detached while quantizing and re-attached, in float, to the result.
    """
    calibration = calibration or CalibrationSpec()
    onnx_path, out = Path(onnx_path), Path(out)
    if target not in TARGETS:
        raise SsdoptError(
            f"int8 target '{target}'", f"one of {', '.join(TARGETS)}", "pick the backend you build for"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        work = Path(tmp)
        head, detached = detach_file(onnx_path, work / "head.onnx")
        if target == "tensorrt":
            record = _quantize_modelopt(head, work / "int8.onnx", reader, calibration, exclude)
        else:
            record = _quantize_ort(
                head,
                work,
                target,
                reader,
                calibration,
                per_channel,
                exclude,
                preprocess_graph,
                calibration_cache,
                latency_timer,
            )
        reasons = {name: "requested" for name in exclude} | dict(exclude_reasons or {})
        reasons |= {name: "latency" for name in record.get("excluded_latency", [])}
        auto_reason = "auto: precision sensitive (decode op, head tail)"
        reasons |= dict.fromkeys(record["excluded_auto"], auto_reason)
        record["float_nodes"] = [{"node": name, "reason": reasons[name]} for name in sorted(reasons)]
        reattach_file(work / "int8.onnx", detached)
        record["decode_node"] = (
            None if detached is None else {"nodes": [n.name for n in detached.nodes], "precision": "float"}
        )
        record["quantized_nodes"] = quantized_compute_nodes(
            onnx.load(str(work / "int8.onnx"), load_external_data=False)
        )
        os.replace(work / "int8.onnx", out)
    return record


def _quantize_ort(
    onnx_path: Path,
    work: Path,
    target: str,
    reader: ImageBatches,
    calibration: CalibrationSpec,
    per_channel: bool,
    exclude: tuple[str, ...] | list[str],
    preprocess_graph: bool,
    calibration_cache: Path | None,
    latency_timer: Timer | None = None,
) -> dict[str, Any]:
    """ORT static QDQ quantization of `onnx_path` into work/int8.onnx."""
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantFormat, quantize_static

    settings = target_settings(target)
    source, pre_error = preprocess(onnx_path, work / "pre.onnx") if preprocess_graph else (onnx_path, None)
    model = onnx.load(str(source), load_external_data=False)
    auto = default_exclusions(model)
    unknown = sorted(set(exclude) - {n.name for n in model.graph.node})
    if unknown:
        raise SsdoptError(
            f"int8 exclude nodes {unknown[:5]}",
            f"node names of {onnx_path.name}",
            "take names from layers.json",
        )
    cache = calibration_cache or calibrate(source, reader, calibration, work / "calibration.json")

    def qdq(nodes_to_exclude: list[str], path: Path) -> list[str]:
        with _quiet():
            quantize_static(
                str(source),
                str(path),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=settings["reduce_range"],
                activation_type=settings["activation_type"],
                weight_type=settings["weight_type"],
                nodes_to_exclude=sorted(set(auto) | set(nodes_to_exclude)),
                calibrate_method=_method(calibration.method),
                extra_options=settings["extra_options"],
                calibration_cache_path=str(cache),
            )
        return quantized_compute_nodes(onnx.load(str(path), load_external_data=False))

    latency: list[str] = []
    latency_record = None
    if latency_timer is not None and target == "onnxruntime":
        latency, latency_record = choose_latency_exclusions(source, qdq, list(exclude), work, latency_timer)
    qdq(sorted(set(exclude) | set(latency)), work / "int8.onnx")
    return {
        "target": target,
        "tool": f"onnxruntime.quantization.quantize_static {ort_version}",
        "format": "QDQ",
        "activation_type": "uint8 asymmetric",
        "weight_type": f"int8 symmetric {'per-channel' if per_channel else 'per-tensor'}"
        + (" (7-bit: reduce_range)" if settings["reduce_range"] else ""),
        "reduce_range": settings["reduce_range"],
        "calibration": {
            "method": calibration.method,
            "num_bins": calibration.num_bins if calibration.method != "minmax" else None,
            "num_quantized_bins": calibration.num_quantized_bins if calibration.method == "entropy" else None,
            "percentile": calibration.percentile if calibration.method == "percentile" else None,
        },
        "preprocessed": preprocess_graph and pre_error is None,
        "preprocess_error": pre_error,
        "excluded_auto": auto,
        "excluded_fallback": sorted(set(exclude)),
        "excluded_latency": latency,
        "latency_probe": latency_record,
    }


def quantized_compute_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of non-Q/DQ nodes that run in int8: weighted ops (Conv, Gemm, MatMul) whose weight comes
    from a DequantizeLinear, Add/Mul whose inputs all do, other ops whose data input does. (An excluded
    conv may still read a dequantized activation that another consumer needed; it does not run in int8.)"""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.input:
            continue
        index = 1 if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else 0
        inputs = node.input if node.op_type in BINARY_OPS else [node.input[index]]
        if all(
            (src := producer.get(name)) is not None and src.op_type == "DequantizeLinear" for name in inputs
        ):
            names.append(node.name)
    return names


def is_quantized(model: onnx.ModelProto) -> bool:
    """True when the graph already holds QuantizeLinear/DequantizeLinear nodes."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _quantize_modelopt(
    onnx_path: Path,
    out: Path,
    reader: ImageBatches,
    calibration: CalibrationSpec,
    exclude: tuple[str, ...] | list[str],
) -> dict[str, Any]:
    """TensorRT-style Q/DQ from NVIDIA ModelOpt (entropy or max calibration)."""
    try:
        from modelopt.onnx.quantization import quantize as modelopt_quantize  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SsdoptError(
            "int8 for target tensorrt",
            "NVIDIA ModelOpt's ONNX quantizer (nvidia-modelopt[onnx], the `tensorrt` extra)",
            "pip install '.[tensorrt]' in the NVIDIA TensorRT container (it replaces onnxruntime with -gpu)",
        ) from exc
    import numpy as np

    if calibration.method not in ("entropy", "minmax"):
        raise SsdoptError(
            f"calibration method '{calibration.method}' for tensorrt",
            "entropy or minmax (ModelOpt: entropy, max)",
            "set build.calibration.method",
        )
    model = onnx.load(str(onnx_path), load_external_data=False)
    batches = reader.arrays()
    data = {reader.input_name: np.concatenate(batches)}
    modelopt_quantize(
        str(onnx_path),
        quantize_mode="int8",
        calibration_data=data,
        calibration_method="entropy" if calibration.method == "entropy" else "max",
        nodes_to_exclude=sorted(set(default_exclusions(model)) | set(exclude)),
        output_path=str(out),
        high_precision_dtype="fp16",
    )
    import modelopt  # type: ignore[import-not-found]

    return {
        "target": "tensorrt",
        "tool": f"modelopt.onnx.quantization {getattr(modelopt, '__version__', '?')}",
        "format": "QDQ (TensorRT placement)",
        "calibration": {"method": calibration.method},
        "excluded_auto": default_exclusions(model),
        "excluded_fallback": sorted(set(exclude)),
        "high_precision_dtype": "fp16",
    }


@dataclass
class BudgetResult:
    """Outcome of quantize_with_budget: the chosen graph, its accuracy and the layers kept in float."""

    path: Path
    within_budget: bool
    budget_points: float
    fp32_map: float
    int8_map: float
    excluded: list[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def drop_points(self) -> float:
        return round(100.0 * (self.fp32_map - self.int8_map), 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "within_budget": self.within_budget,
            "budget_points": self.budget_points,
            "fp32_map": self.fp32_map,
            "int8_map": self.int8_map,
            "drop_points": self.drop_points,
            "fallback_layers": self.excluded,
            "rounds": self.rounds,
        }


def quantize_with_budget(
    onnx_path: Path | str,
    out: Path | str,
    *,
    target: str,
    reader: ImageBatches,
    evaluate: Callable[[Path], float],
    calibration: CalibrationSpec | None = None,
    budget_points: float = 1.0,
    max_rounds: int = 4,
    layers_per_round: int = 2,
    sensitivity_batches: int = 4,
    per_channel: bool = True,
    exclude: tuple[str, ...] | list[str] = (),
    preprocess_graph: bool = True,
    fp32_map: float | None = None,
    fallback_op_types: tuple[str, ...] | None = None,
    latency_timer: Timer | None = None,
) -> BudgetResult:
    """INT8 within an accuracy budget: quantize, evaluate, and while mAP drops more than
    `budget_points` (mAP points, 0-100 scale) keep the `layers_per_round` most damaging layers in
    float (layer_sensitivity) and re-quantize, up to `max_rounds` times.

    `evaluate(graph_path)` returns the mAP of an ONNX graph as a fraction in [0, 1]; it is called on
    the float graph first (unless `fp32_map` is given) and on each round's int8 graph.
    `fallback_op_types` limits which quantized nodes may fall back (default: all but data movement).
    `latency_timer` (onnxruntime): node groups measured faster in float are kept float from round 0.
    Calibration runs once; its ranges are reused by every round. The first round within budget is written to
    `out`; if none is, the most accurate one, with `within_budget=False`.
    """
    from ssdopt.quantize.sensitivity import layer_sensitivity

    if target == "tensorrt":
        raise SsdoptError(
            "quantize_with_budget target tensorrt", "onnxruntime or openvino", "use ModelOpt's own flow"
        )
    calibration = calibration or CalibrationSpec()
    onnx_path, out = Path(onnx_path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.budget-") as tmp:
        work = Path(tmp)
        reference = checked_map(evaluate(onnx_path) if fp32_map is None else fp32_map, str(onnx_path))
        head, detached = detach_file(onnx_path, work / "head.onnx")
        source, pre_error = preprocess(head, work / "pre.onnx") if preprocess_graph else (head, None)
        cache = calibrate(source, reader, calibration, work / "calibration.json")
        batches = reader.arrays(sensitivity_batches)
        reasons = {name: "requested" for name in exclude}
        latency_record = None
        if latency_timer is not None and target == "onnxruntime":

            def qdq(nodes: list[str], path: Path) -> list[str]:
                return quantize_int8(
                    source,
                    path,
                    target=target,
                    reader=reader,
                    calibration=calibration,
                    per_channel=per_channel,
                    exclude=nodes,
                    preprocess_graph=False,
                    calibration_cache=cache,
                )["quantized_nodes"]

            latency, latency_record = choose_latency_exclusions(
                source, qdq, list(exclude), work, latency_timer
            )
            reasons |= {name: "latency" for name in latency if name not in reasons}

        def build(round_index: int, nodes: list[str]) -> tuple[tuple[Path, Path, dict[str, Any]], float]:
            """This round's int8 graph (decode node back on) with `nodes` float, its head-only graph
            (what layer_sensitivity compares), its record, and its mAP."""
            graph = work / f"int8_round{round_index}.onnx"
            record = quantize_int8(
                source,
                graph,
                target=target,
                reader=reader,
                calibration=calibration,
                per_channel=per_channel,
                exclude=nodes,
                preprocess_graph=False,
                calibration_cache=cache,
                exclude_reasons={name: reasons.get(name, "accuracy") for name in nodes},
            )
            head_graph = work / f"int8_round{round_index}_head.onnx"
            os.replace(graph, head_graph)
            onnx.save(reattach_decode(onnx.load(str(head_graph)), detached), str(graph))
            return (graph, head_graph, record), checked_map(evaluate(graph), str(graph))

        def rank(candidate: tuple[Path, Path, dict[str, Any]]) -> list[dict[str, Any]]:
            return layer_sensitivity(source, candidate[1], batches, reader.input_name, fallback_op_types)

        outcome = budget_rounds(
            build,
            rank,
            reference=reference,
            exclude=list(reasons),
            budget_points=budget_points,
            max_rounds=max_rounds,
            layers_per_round=layers_per_round,
        )
        graph, _, record = outcome.candidate
        os.replace(graph, out)
    record = {
        **record,
        "preprocessed": preprocess_graph and pre_error is None,
        "preprocess_error": pre_error,
        "excluded_latency": sorted(n for n, why in reasons.items() if why == "latency"),
        "latency_probe": latency_record,
    }
    result = BudgetResult(
        out,
        outcome.within_budget,
        budget_points,
        reference,
        outcome.map,
        outcome.excluded,
        outcome.rounds,
        record,
    )
    record["fallback"] = result.to_dict()
    return result
