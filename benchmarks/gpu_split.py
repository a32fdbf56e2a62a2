#!/usr/bin/env python
"""GPU end to end vs split: where the batch-1 time of the torch-aoti GPU engine goes (issue 5).

    python benchmarks/gpu_split.py          # device tool: writes $OUT/gpu_split.json

For the reference ssdlite320 at fp32 and fp16, each in a CUDA graph (inputs resident on the device):
  network   normalise + backbone + head, torch.compile (Inductor, freezing) -- the engine's own recipe
  op        ssdopt::decode_nms alone on that network's real head outputs
  both      the whole detector (network + op), compiled as one program, as the engine runs it
plus torchvision's eager model with its own post-processing under the full timing plan (>= 3 s and
>= 200 iterations), the baseline of the speed-up. Stages and helpers are those of aoti_gpu.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aoti_gpu  # noqa: E402  (benchmarks/aoti_gpu.py: op build, model, images, timing)


def graphed(fn: Any, example: Any) -> Any:
    """fn(example) captured in a CUDA graph after warm-up; returns a replay callable."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn(example)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn(example)
    return graph.replay


def op_only(detector: Any, deltas: Any, logits: Any) -> Any:
    """decode_nms alone on fixed head outputs, with the detector's own attributes."""
    import torch

    a = detector.attributes
    names = (
        "score_threshold",
        "iou_threshold",
        "pre_nms_top_k",
        "max_detections",
        "box_weights",
        "softmax",
        "background_class",
        "class_agnostic",
        "image_height",
        "image_width",
    )
    args = [a[n] for n in names]
    return lambda _: torch.ops.ssdopt.decode_nms(deltas, logits, detector.anchors, *args)


def candidates(detector: Any, logits: Any) -> int:
    """(anchor, class) pairs above the score threshold: the op's work."""
    import torch

    scores = torch.softmax(logits.float(), -1)[..., 1:]
    return int((scores > detector.attributes["score_threshold"]).sum().item())


def full_plan(fn: Any, batch: int) -> dict[str, Any]:
    from ssdopt.evaluate.latency import TimingPlan, time_cuda

    stats = time_cuda(fn, TimingPlan(warmup_s=0.5, min_duration_s=3.0, min_iterations=200), batch)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.as_dict().items()}


def main() -> int:
    import torch

    from ssdopt.backends.aoti_detector import detector_module, inductor_configs
    from ssdopt.models.zoo import model_image_size

    out = Path(os.environ.get("OUT", "benchmarks/results"))
    report = aoti_gpu.Report(out / "gpu_split.json", budget_s=float(os.environ.get("BUDGET_S", "380")))
    report.data["script"] = "benchmarks/gpu_split.py"
    results = report.data["results"]
    with report.stage("environment"):
        report.data["environment"] = aoti_gpu.environment("cuda")
    with report.stage("op library") as rec:
        aoti_gpu.load_op_library("cuda", rec, Path("/tmp/gpu_split"))
    model, info = aoti_gpu.load_model(False, aoti_gpu.CHECKPOINT)
    results["model"] = info
    size = model_image_size(model)
    name = "torchvision eager fp32, its own post-processing, batch 1 (full plan)"
    with report.stage(name, needs_s=20) as rec:
        if rec is None:
            return 1
        m = model.to("cuda").eval()
        image = [aoti_gpu.test_images(1, size, seed=4)[0].cuda()]
        with torch.no_grad():
            results["torchvision_eager_fp32_batch1"] = full_plan(lambda: m(image), 1)
        model.to("cpu")
    options = {**inductor_configs(False), "triton.cudagraphs": False}
    for precision in ("fp32", "fp16"):
        res = results.setdefault(precision, {})
        detector = detector_module(model, precision).cuda()
        for batch in (1, 32):
            x = aoti_gpu.test_images(batch, size, seed=2).cuda()
            with report.stage(f"{precision} batch {batch}: network / op / both", needs_s=60) as rec:
                if rec is None:
                    continue
                t0 = time.perf_counter()
                network = torch.compile(detector.head_outputs, fullgraph=True, dynamic=False, options=options)
                whole = torch.compile(detector, fullgraph=True, dynamic=False, options=options)
                with torch.no_grad():
                    deltas, logits = (t.clone() for t in network(x))
                op = op_only(detector, deltas, logits)
                row = {
                    "network": full_plan(graphed(network, x), batch),
                    "op": full_plan(graphed(op, x), batch),
                    "both": full_plan(graphed(whole, x), batch),
                    "candidates_per_image": candidates(detector, logits) / batch,
                    "compile_and_capture_s": round(time.perf_counter() - t0, 1),
                }
                res[str(batch)] = row
                print(
                    f"   {precision} b{batch}: network {row['network']['median_ms']:.3f} ms, op "
                    f"{row['op']['median_ms']:.3f} ms, both {row['both']['median_ms']:.3f} ms",
                    flush=True,
                )
        del detector
    report.save()
    print(json.dumps(results, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
