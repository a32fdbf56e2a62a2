"""Profile ONNX Runtime engines (ssdopt build output) with ORT's own profiler, batch 1, this CPU.

Usage: python benchmarks/ort_profile.py ENGINE_DIR [ENGINE_DIR ...] [--runs 300] [--threads N] [--out X.json]

Per engine: time per op type (sum over nodes, mean per run), the top nodes, how many convolutions
ran quantized (QLinearConv / ConvInteger / a fused QDQ conv) vs float, and depthwise (group == C)
convolutions' share. Images are real calibration images (data/calibration), pre-processed as the
engine expects, so SSDDecodeNMS sees real scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx


def _groups(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Conv-like node name -> {group, out_channels} from the engine graph (initializer shapes)."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    info = {}
    for node in model.graph.node:
        if "Conv" not in node.op_type:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        wname = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        dims = inits.get(wname, [])
        info[node.name] = {"group": group, "out": dims[0] if dims else -1, "op": node.op_type}
    return info


def profile(engine: Path, runs: int, images: np.ndarray, threads: int | None = None) -> dict:
    import onnxruntime as ort

    from ssdopt.backends.base import Engine
    from ssdopt.backends.onnxruntime import _session_options, _use_engine_kernel

    meta = Engine.open(engine).metadata
    if meta.get("has_decode_nms"):
        _use_engine_kernel(engine, meta)
    options = _session_options(bool(meta.get("has_decode_nms")), threads or meta["spec"].get("threads"))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    tmp = tempfile.mkdtemp(prefix="ortprof-")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tmp) / "p")
    path = engine / meta["engine"]["file"]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(20):  # warm-up, dropped below by run index
        session.run(None, {name: images[i % len(images)][None]})
    for i in range(runs):
        session.run(None, {name: images[i % len(images)][None]})
    trace = json.loads(Path(session.end_profiling()).read_text())
    model = onnx.load(str(path), load_external_data=False)
    groups = _groups(model)
    model_runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    keep_after = model_runs[20]["ts"] if len(model_runs) > 20 else 0
    per_type: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    node_type: dict[str, str] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < keep_after:
            continue
        op = e["args"].get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        per_type[op] += e["dur"]
        per_node[node] += e["dur"]
        node_type[node] = op
    run_us = sorted(e["dur"] for e in model_runs[20:])
    n = max(len(run_us), 1)
    conv = {"float_dw": 0.0, "float_other": 0.0, "int8_dw": 0.0, "int8_other": 0.0}
    counts = defaultdict(int)
    for node, us in per_node.items():
        g = groups.get(node)
        if g is None:
            continue
        dw = g["group"] > 1 and g["group"] == g["out"]
        quant = g["op"] in ("QLinearConv", "ConvInteger") or "Int" in g["op"]
        key = f"{'int8' if quant else 'float'}_{'dw' if dw else 'other'}"
        conv[key] += us / n
        counts[f"{g['op']}{' (depthwise)' if dw else ''}"] += 1
    return {
        "engine": str(engine),
        "precision": meta["precision"],
        "threads": threads or meta["spec"].get("threads"),
        "runs": len(run_us),
        "model_run_us_median": run_us[len(run_us) // 2] if run_us else None,
        "kernel_us_per_run": round(sum(per_type.values()) / n, 1),
        "per_op_type_us": {k: round(v / n, 1) for k, v in sorted(per_type.items(), key=lambda kv: -kv[1])},
        "op_type_counts": dict(sorted(Counter(node_type.values()).items())),
        "conv_counts": dict(counts),
        "conv_us_per_run": {k: round(v, 1) for k, v in conv.items()},
        "top_nodes_us": [
            {"node": k, "op": node_type[k], "us": round(v / n, 1), **groups.get(k, {})}
            for k, v in sorted(per_node.items(), key=lambda kv: -kv[1])[:25]
        ],
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engines", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the engine's)")
    args = parser.parse_args(argv)
    from ssdopt.quantize.calibration_reader import calibration_reader

    reader = calibration_reader(args.calibration, 320, "images", 32, 1)
    images = np.concatenate(reader.arrays(32))
    results = [profile(e, args.runs, images, args.threads) for e in args.engines]
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
