#!/usr/bin/env python
"""The GPU network's floor (issue 13 item 5): which compile recipe of the torch-aoti detector pays.

    OUT=<dir> [CK=<checkpoint>] [VARIANTS=base,cudnn,...] [BATCHES=256] python benchmarks/gpu_floor.py

Each variant compiles the whole detector (normalise + backbone + head + anchors + ssdopt::decode_nms,
fp16, as the engine runs it) with torch.compile (Inductor, freezing, no internal CUDA graphs), in its own
child process with a time bound, then captures it in a CUDA graph and reports: the batch-1 replay median
(CUDA events, >= 2 s and >= 300 replays), images/s at each of BATCHES, the number of kernels one
uncaptured batch-1 call launches (torch.profiler), compile times, and whether its detections match the
base recipe's on 8 synthetic-shapes images (count per image, sorted scores). The JSON is rewritten after
every variant, so a timeout still leaves what was measured. What wins goes into the backend
(aoti_detector.LARGE_BATCH_CONFIGS); the committed engine figures come from `ssdopt bench --device cuda`
(benchmarks/gpu_cli.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_split import graphed, test_images  # noqa: E402 - this folder's sibling script, on sys.path

# name -> (Inductor options on top of the engine's, cudnn.benchmark, channels-last weights and input)
VARIANTS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "base": ({}, False, False),
    "cudnn": ({}, True, False),
    "layout": ({"force_layout_optimization": True}, True, False),
    "channels_last": ({}, True, True),
    "mm1x1": ({"conv_1x1_as_mm": True, "force_layout_optimization": True}, True, False),
    "autotune": (
        {
            "max_autotune": True,
            "max_autotune_conv_backends": "ATEN,TRITON",
            "force_layout_optimization": True,
        },
        True,
        False,
    ),
}


def _median_ms(replay: Any, min_s: float, min_iter: int) -> float:
    import torch

    for _ in range(20):
        replay()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iter or time.perf_counter() - start < min_s:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _kernel_count(fn: Any, x: Any) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(x)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def child(name: str, checkpoint: Path, out: Path) -> int:
    """One variant in this process: compile, check, time; writes out/<name>.json."""
    import torch

    os.environ.setdefault("SSDOPT_NMS_CUDA", "1")
    from ssdopt.backends.aoti_detector import detector_module, inductor_configs
    from ssdopt.models.zoo import load_checkpoint, model_image_size
    from ssdopt.ops.library import load_torch_ops

    load_torch_ops()
    extra, cudnn_benchmark, channels_last = VARIANTS[name]
    torch.backends.cudnn.benchmark = cudnn_benchmark
    model, _ = load_checkpoint(checkpoint)
    size = model_image_size(model)
    detector = detector_module(model, "fp16").cuda()
    if channels_last:
        detector = detector.to(memory_format=torch.channels_last)
    options = {**inductor_configs(False), "triton.cudagraphs": False, **extra}
    compiled = torch.compile(detector, fullgraph=True, dynamic=False, options=options)

    def fn(x: Any) -> Any:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return compiled(x)

    row: dict[str, Any] = {
        "variant": name,
        "options": extra,
        "cudnn_benchmark": cudnn_benchmark,
        "channels_last": channels_last,
    }
    images = test_images(8, size, seed=2).cuda()
    t0 = time.perf_counter()
    replay = graphed(fn, images[:1].clone())
    row["compile_batch1_s"] = round(time.perf_counter() - t0, 1)
    row["batch1_median_ms"] = round(_median_ms(replay, 2.0, 300), 4)
    row["kernels_per_call_batch1"] = _kernel_count(fn, images[:1])
    detections = []
    with torch.no_grad():
        for i in range(8):
            detections.append([t.detach().cpu() for t in fn(images[i : i + 1])])
    torch.save(detections, out / f"{name}_detections.pt")
    del replay
    for batch in [int(b) for b in os.environ.get("BATCHES", "256").split(",") if b]:
        t0 = time.perf_counter()
        big = test_images(16, size, seed=3).cuda().repeat((batch + 15) // 16, 1, 1, 1)[:batch].contiguous()
        replay = graphed(fn, big)
        row[f"compile_batch{batch}_s"] = round(time.perf_counter() - t0, 1)
        ms = _median_ms(replay, 2.0, 30)
        row[f"batch{batch}_median_ms"] = round(ms, 3)
        row[f"batch{batch}_images_per_s"] = round(batch / ms * 1000.0, 0)
        del replay
    row["torch"] = torch.__version__
    row["gpu"] = torch.cuda.get_device_name()
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return 0


def _same(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Detections of two variants: counts equal per image; largest difference of the sorted scores."""
    score = 0.0
    counts_equal = True
    for (na, _, sa, _), (nb, _, sb, _) in zip(a, b, strict=True):
        if not bool((na == nb).all()):
            counts_equal = False
            continue
        n = int(na[0])
        if n:
            diff = (sa[0, :n].sort().values - sb[0, :n].sort().values).abs().max()
            score = max(score, float(diff))
    return {"counts_equal": counts_equal, "max_sorted_score_diff": round(score, 5)}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        out = Path(os.environ["OUT"])
        return child(sys.argv[2], Path(os.environ["CK"]), out)
    import torch

    out = Path(os.environ.get("OUT", "/tmp/gpu_floor"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = os.environ.get("CK", str(REPO / "data/reference/ssdlite320_shapes.safetensors"))
    names = [n for n in os.environ.get("VARIANTS", ",".join(VARIANTS)).split(",") if n]
    timeout = float(os.environ.get("VARIANT_TIMEOUT_S", "240"))
    deadline = time.monotonic() + float(os.environ.get("BUDGET_S", "540"))
    report: dict[str, Any] = {"script": "benchmarks/gpu_floor.py", "checkpoint": checkpoint, "variants": {}}
    env = {**os.environ, "OUT": str(out), "CK": checkpoint, "PYTHONUNBUFFERED": "1"}
    for name in names:
        left = deadline - time.monotonic()
        if left < 60:
            report["variants"][name] = {"error": "skipped: BUDGET_S spent"}
            continue
        limit = min(timeout, left)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name],
                env=env,
                timeout=limit,
                capture_output=True,
                text=True,
            )
            row = (
                json.loads((out / f"{name}.json").read_text())
                if proc.returncode == 0
                else {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
            )
        except subprocess.TimeoutExpired:
            row = {"error": f"did not finish within {limit:.0f} s"}
        row["wall_s"] = round(time.monotonic() - t0, 1)
        base, mine = out / "base_detections.pt", out / f"{name}_detections.pt"
        if name != "base" and base.is_file() and mine.is_file():
            row["vs_base"] = _same(torch.load(base), torch.load(mine))
        report["variants"][name] = row
        print(name, json.dumps(row)[:400], flush=True)
        (out / "gpu_floor.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
