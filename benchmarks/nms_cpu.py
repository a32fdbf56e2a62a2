"""CPU benchmark of SSDDecodeNMS: the C++ kernel (torch op and C ABI) vs torchvision's SSD post-processing.

Same inputs and attributes as benchmarks/nms_gpu.py (A = 3234, default attributes); wall-clock median
over repeated calls in one process, so the ratio is measured under the same conditions.

    python benchmarks/nms_cpu.py --out benchmarks/results/nms_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nms_gpu import ATTRS, NUM_ANCHORS, head_outputs, ssd_model, torchvision_postprocess  # noqa: E402

from ssdopt.ops import decode_nms  # noqa: E402
from ssdopt.ops.library import decode_nms_numpy, load_torch_ops  # noqa: E402


def median_ms(fn, budget_s: float, min_iters: int = 5, max_iters: int = 200) -> tuple[float, int]:  # noqa: ANN001
    fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    iters = int(max(min_iters, min(max_iters, budget_s / max(single, 1e-6))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, iters


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nms_cpu.json"))
    parser.add_argument("--classes", type=int, nargs="+", default=[9, 91])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget-s", type=float, default=3.0)
    args = parser.parse_args()
    load_torch_ops()
    rows = []
    for num_classes in args.classes:
        model = ssd_model(num_classes, "cpu")
        for batch in args.batches:
            deltas, logits, anchors = head_outputs(
                batch, num_classes, seed=batch * 100 + num_classes, device="cpu"
            )
            arrays = (deltas.numpy(), logits.numpy(), anchors.numpy())
            row = {"A": NUM_ANCHORS, "C": num_classes, "B": batch}
            with torch.no_grad():
                row["torchvision_postprocess_ms"], row["torchvision_iters"] = median_ms(
                    functools.partial(torchvision_postprocess, model, deltas, logits, anchors), args.budget_s
                )
            row["ours_torch_op_ms"], row["ours_torch_op_iters"] = median_ms(
                functools.partial(decode_nms, deltas, logits, anchors, **ATTRS), args.budget_s
            )
            row["ours_c_abi_ms"], row["ours_c_abi_iters"] = median_ms(
                functools.partial(decode_nms_numpy, *arrays, **ATTRS), args.budget_s
            )
            row["speedup_vs_postprocess"] = row["torchvision_postprocess_ms"] / row["ours_torch_op_ms"]
            ref = torchvision_postprocess(model, deltas, logits, anchors)
            num = decode_nms(deltas, logits, anchors, **ATTRS)[0]
            row["num_detections_equal"] = all(int(num[b]) == ref[b]["scores"].numel() for b in range(batch))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "SSDDecodeNMS CPU",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "attributes": ATTRS,
        "timing": "wall clock per call, median; iterations time-boxed per method",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
