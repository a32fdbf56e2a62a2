"""Soak: many consecutive build + evaluate cycles in one process; resident memory must not creep.

    python benchmarks/soak.py --cycles 50 --out benchmarks/results/soak.json

Each cycle builds the tiny test detector (tests/backends/tiny_model.py) afresh for every backend
(a new output directory, so nothing is reused), evaluates it (pycocotools mAP on a small synthetic
val split, then a short batch-1 latency run) and deletes it. RSS (VmRSS of /proc/self/status) is
sampled after every cycle, after a garbage collection; growth is measured from the end of the
warm-up cycles (first imports, runtime initialisation and allocator pools are not a leak) to the
last cycle. A long service (`ssdopt serve`) repeats exactly this loop, so a leak here is a leak there.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THRESHOLD_PCT = 10.0


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS), or psutil's where /proc is absent."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import psutil  # only off Linux

    return psutil.Process().memory_info().rss / 2**20


def _tiny_model():
    """The test suite's tiny SSD-shaped detector (exported with torch.onnx, as ssdopt.export does)."""
    name = "ssdopt_tests_tiny_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "backends" / "tiny_model.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def cycle(export: Path, dataset: Any, work: Path, backends: list[str], index: int) -> dict[str, Any]:
    """One build + evaluate of every backend; returns its numbers (the engines are deleted)."""
    from ssdopt.build import build_engine
    from ssdopt.evaluate.engine import engine_latency, evaluate_engine
    from ssdopt.evaluate.latency import TimingPlan

    start = time.perf_counter()
    out = work / f"cycle-{index}"
    row: dict[str, Any] = {"cycle": index}
    plan = TimingPlan(warmup_s=0.02, min_duration_s=0.1, min_iterations=10)
    for backend in backends:
        engine = build_engine(backend, "fp32", export, out)
        result = evaluate_engine(engine, dataset, progress=False)
        latency = engine_latency(engine, batch=1, plan=plan)
        row[backend] = {"map": result.metrics["map"], "p50_ms": latency.median_ms}
    shutil.rmtree(out)
    gc.collect()
    row["seconds"] = time.perf_counter() - start
    row["rss_mb"] = rss_mb()
    return row


def soak(
    cycles: int,
    warmup: int,
    backends: list[str],
    time_limit_s: float | None,
    work: Path,
    onnx: Path | None = None,
) -> dict[str, Any]:
    """Run the loop (at most `cycles`, or until `time_limit_s` after warm-up); returns the record."""
    from ssdopt.data.coco import load_coco
    from ssdopt.data.synthetic import generate_dataset

    tiny = _tiny_model()
    export = onnx or tiny.export_tiny(work / "export").model
    data = generate_dataset(
        work / "data", seed=11, image_size=tiny.IMAGE_SIZE, splits={"val": 8}, workers=1, progress=False
    )
    dataset = load_coco(data / "val.json")
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    measured_from = None
    for index in range(cycles):
        rows.append(cycle(export, dataset, work, backends, index))
        print(
            f"cycle {index:3d}: {rows[-1]['seconds']:5.2f} s, RSS {rows[-1]['rss_mb']:7.1f} MiB", flush=True
        )
        if index + 1 == warmup:
            measured_from = time.perf_counter()
        if time_limit_s and measured_from and time.perf_counter() - measured_from > time_limit_s:
            break
    measured = rows[min(warmup, len(rows)) - 1 :]  # from the baseline sample (end of warm-up) on
    start_mb, end_mb = measured[0]["rss_mb"], measured[-1]["rss_mb"]
    growth = 100.0 * (end_mb - start_mb) / start_mb
    return {
        "cycles": len(rows),
        "warmup_cycles": warmup,
        "backends": backends,
        "rss_first_cycle_mb": round(rows[0]["rss_mb"], 1),
        "rss_after_warmup_mb": round(start_mb, 1),
        "rss_end_mb": round(end_mb, 1),
        "rss_max_mb": round(max(r["rss_mb"] for r in rows), 1),
        "rss_growth_pct": round(growth, 2),
        "rss_slope_mb_per_cycle": round(_slope([r["rss_mb"] for r in measured]), 4),
        "threshold_pct": THRESHOLD_PCT,
        "passed": growth < THRESHOLD_PCT,
        "seconds_total": round(time.perf_counter() - began, 1),
        "seconds_per_cycle_median": round(sorted(r["seconds"] for r in measured)[len(measured) // 2], 3),
        "rows": [{**r, "seconds": round(r["seconds"], 3), "rss_mb": round(r["rss_mb"], 1)} for r in rows],
    }


def _slope(values: list[float]) -> float:
    """Least-squares MiB per cycle: a steady leak shows as a positive slope even under the threshold."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def all_finite(record: dict[str, Any]) -> bool:
    """Every number in the record is finite (the smoke test's check)."""

    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return all(walk(v) for v in value.values())
        if isinstance(value, list):
            return all(walk(v) for v in value)
        if isinstance(value, float):
            return math.isfinite(value)
        return True

    return walk(record)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1, help="Cycles before the RSS baseline.")
    parser.add_argument("--time-limit", type=float, default=None, help="Stop after this many seconds.")
    parser.add_argument("--backends", default="onnxruntime,openvino", help="Comma-separated backends.")
    parser.add_argument("--onnx", type=Path, default=None, help="A tiny export to reuse (default: export).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args(argv)
    if args.cycles <= args.warmup:
        parser.error("--cycles must exceed --warmup")

    from ssdopt.backends.device import cpu_info

    with tempfile.TemporaryDirectory(prefix="ssdopt-soak-") as work:
        record = soak(
            args.cycles, args.warmup, args.backends.split(","), args.time_limit, Path(work), args.onnx
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**cpu_info(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "tests/backends/tiny_model.py (64x64, 2 feature maps), fp32, 8 val images per evaluation",
        **record,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{result['cycles']} cycles in {result['seconds_total']} s: RSS {result['rss_after_warmup_mb']} -> "
        f"{result['rss_end_mb']} MiB ({result['rss_growth_pct']:+.2f} %, limit {THRESHOLD_PCT} %)"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
