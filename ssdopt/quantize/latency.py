"""INT8 exclusions chosen by measured latency (ONNX Runtime CPU target).

Why: int8 is not faster everywhere. On the ssdlite head the Q/DQ graph's QLinearConv kernels are only
~1.2x the NCHWc fp32 convolutions on an AVX-512 VNNI + AMX Xeon, and the glue int8 adds (QLinearMul of
the decomposed HardSwish, stand-alone Q/DQ around HardSigmoid and ReduceMean) eats most of it. Whether a
group of nodes (all depthwise convolutions, all quantized Mul, ...) is faster left in float depends on
the CPU, so it is measured at build time: quantize with the group in float, time both graphs
interleaved, keep the group in float only when that is faster by `margin`. Bounded: a few groups, each
timed for `seconds`, one quantize_static per group (calibration ranges reused).

ONNX Runtime's WeightBiasQuantization transformer (ORT_ENABLE_ALL) re-quantizes the weights of a float
Conv that sits between a DequantizeLinear and a QuantizeLinear, i.e. it silently undoes an exclusion;
timing and engines are therefore built with it disabled (DISABLED_OPTIMIZERS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# ORT graph transformers that would undo a float exclusion in a Q/DQ graph (see module docstring).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
GROUP_OP_TYPES = ("Mul", "Add")  # quantized non-conv op types probed as groups (besides convolutions)

# seconds per graph: one figure each, or one per interleaved round (then float must win every round)
Timer = Callable[[list[Path]], list[float] | list[list[float]]]


def _is_depthwise(node: onnx.NodeProto) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and group > 1


def candidate_groups(model: onnx.ModelProto, quantized: list[str]) -> dict[str, list[str]]:
    """Groups of quantized nodes (names) whose precision is probed together: depthwise convolutions,
    and each op type of GROUP_OP_TYPES. `quantized`: nodes that run int8 in the full Q/DQ graph."""
    quantized_set = set(quantized)
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name not in quantized_set or not node.name:
            continue
        if _is_depthwise(node):
            groups.setdefault("depthwise Conv", []).append(node.name)
        elif node.op_type in GROUP_OP_TYPES:
            groups.setdefault(node.op_type, []).append(node.name)
    return groups


def ort_timer(threads: int | None = None, seconds: float = 1.0, rounds: int = 3) -> Timer:
    """Median batch-1 latency (s) of each ONNX graph, ORT CPU, ORT_ENABLE_ALL (as the engine is built),
    timed interleaved in `rounds` rounds of `seconds` each: per graph, each round's median."""

    def measure(paths: list[Path]) -> list[float]:
        import onnxruntime as ort

        sessions = []
        feed: dict[str, np.ndarray] = {}
        for path in paths:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = int(threads)
            session = ort.InferenceSession(
                str(path),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(DISABLED_OPTIMIZERS),
            )
            if not feed:
                image = session.get_inputs()[0]
                shape = [1 if not isinstance(d, int) else d for d in image.shape]
                shape[0] = 1
                feed = {image.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
            sessions.append(session)
        medians: list[list[float]] = [[] for _ in paths]
        for _ in range(rounds):
            for index, session in enumerate(sessions):
                for _ in range(5):
                    session.run(None, feed)
                times = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 5:
                    tick = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - tick)
                medians[index].append(float(np.median(times)))
        return medians

    return measure


def _float_wins(int8_s: float | list[float], float_s: float | list[float], margin: float) -> bool:
    """Float faster than int8 by more than `margin`: in every round where the timer gives rounds (on a
    shared 2-core VM one round's noise exceeds a 3% margin; the same graph read 14-20 ms in one build)."""
    pairs = zip(int8_s, float_s, strict=True) if isinstance(int8_s, list) else [(int8_s, float_s)]
    return all(f < i * (1.0 - margin) for i, f in pairs)


def _ms(seconds: float | list[float]) -> float:
    return round(1e3 * float(np.median(seconds)), 3)


def choose_latency_exclusions(
    source: Path,
    quantize: Callable[[list[str], Path], list[str]],
    base_exclude: list[str],
    work: Path,
    timer: Timer,
    margin: float = 0.03,
    max_groups: int = 4,
) -> tuple[list[str], dict[str, Any]]:
    """Greedy: for each candidate group, quantize with it (and the groups kept so far) in float, time it
    against the current best graph, keep it in float if faster by more than `margin` (a fraction).

    `quantize(exclude, out) -> quantized node names` writes the Q/DQ graph of `source` with `exclude` in
    float. Returns (names kept in float for latency, record of each probe in ms).
    """
    best_path = work / "latency_base.onnx"
    quantized = quantize(list(base_exclude), best_path)
    groups = candidate_groups(onnx.load(str(source), load_external_data=False), quantized)
    chosen: list[str] = []
    probes: list[dict[str, Any]] = []
    start = time.perf_counter()
    for index, (group, names) in enumerate(list(groups.items())[:max_groups]):
        trial = work / f"latency_probe{index}.onnx"
        quantize(sorted(set(base_exclude) | set(chosen) | set(names)), trial)
        int8_s, float_s = timer([best_path, trial])
        keep_float = _float_wins(int8_s, float_s, margin)
        probe = {
            "group": group,
            "nodes": len(names),
            "int8_ms": _ms(int8_s),
            "float_ms": _ms(float_s),
            "kept_float": keep_float,
        }
        if isinstance(int8_s, list):
            probe["rounds_ms"] = {
                "int8": [round(1e3 * v, 3) for v in int8_s],
                "float": [round(1e3 * v, 3) for v in float_s],
            }
        probes.append(probe)
        if keep_float:
            chosen += names
            best_path = trial
    record = {
        "method": "per-group batch-1 latency, int8 vs float, interleaved (ssdopt.quantize.latency)",
        "margin": margin,
        "rule": "kept float only when faster by the margin in every interleaved round",
        "probes": probes,
        "skipped_groups": [g for g in list(groups)[max_groups:]],
        "time_s": round(time.perf_counter() - start, 2),
    }
    return sorted(chosen), record
