"""Issue 4 check: an ssd300_vgg16-shaped detector (random weights, the 10 shape classes) as INT8 vs
ONNX Runtime fp32 on this CPU, batch 1, end to end (decode + NMS in the graph), one process.

    python benchmarks/ssd300_int8_cpu.py --out benchmarks/results/ssd300_int8_cpu.json

Random weights say nothing about mAP; this measures speed only. BatchNorm-free VGG: fusion is
Conv+ReLU. Calibration: the first 64 images of the DVC calibration set.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from ssdopt.backends.base import BuildSpec, CalibrationSpec
from ssdopt.backends.device import cpu_info
from ssdopt.build import build_engine
from ssdopt.evaluate.engine import engine_latency
from ssdopt.evaluate.latency import TimingPlan
from ssdopt.export import export_onnx, write_decode_nms_variant
from ssdopt.models.zoo import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ssd300_int8_cpu.json"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model("ssd300_vgg16", num_classes=11).eval()
    plan = TimingPlan(warmup_s=0.5, min_duration_s=args.seconds, min_iterations=20)
    calibration = CalibrationSpec(directory=args.calibration, num_images=args.calibration_images)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        export = export_onnx(
            model,
            Path(work) / "onnx",
            image_size=300,
            tolerance=1e-3,  # random-weight VGG: outputs in the hundreds, 1.6e-4 abs = 1e-6 relative
            meta={"model": "ssd300_vgg16", "class_names": ["__background__"] + [f"c{i}" for i in range(10)]},
        )
        graph = write_decode_nms_variant(export)
        engines = {}
        for backend, precision in (
            ("onnxruntime", "fp32"),
            ("onnxruntime", "int8"),
            ("openvino", "fp32"),
            ("openvino", "int8"),
        ):
            spec = BuildSpec(precision=precision, calibration=calibration)
            engines[(backend, precision)] = build_engine(
                backend, precision, graph, Path(work) / "engines", spec
            )
        # interleave two rounds so drift on a shared machine hits every engine alike
        samples: dict[tuple[str, str], list] = {k: [] for k in engines}
        for _ in range(2):
            for key, engine in engines.items():
                samples[key].append(engine_latency(engine, batch=1, plan=plan))
        base = min(s.median_ms for s in samples[("onnxruntime", "fp32")])
        for (backend, precision), stats in samples.items():
            best = min(stats, key=lambda s: s.median_ms)
            rows.append(
                {
                    "backend": backend,
                    "precision": precision,
                    "p50_ms": best.median_ms,
                    "p99_ms": best.p99_ms,
                    "min_ms": best.min_ms,
                    "iterations": best.iterations,
                    "speedup_vs_ort_fp32": base / best.median_ms,
                }
            )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            **cpu_info(),
            "cores": len(__import__("os").sched_getaffinity(0)),
            "python": platform.python_version(),
        },
        "command": "python benchmarks/ssd300_int8_cpu.py",
        "model": "ssd300_vgg16, random weights, 11 classes, 300x300, SSDDecodeNMS in the graph",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['backend']:12s} {row['precision']:5s} p50 {row['p50_ms']:8.1f} ms"
            f"  p99 {row['p99_ms']:8.1f} ms  x{row['speedup_vs_ort_fp32']:.2f} vs ORT fp32"
        )


if __name__ == "__main__":
    main()
