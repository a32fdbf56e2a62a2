#!/usr/bin/env python
"""Where the batch-1 time of the torch-aoti GPU engine goes: what `ssdopt bench --device cuda` cannot
split (its time split is the CPU's; on the GPU network and op run inside one CUDA graph).

    OUT=<dir> CK=<checkpoint> python benchmarks/gpu_split.py   # GPU machine: writes $OUT/gpu_split.json

For the checkpoint (default the reference ssdlite320) at fp32 and fp16, each in a CUDA graph (inputs
resident on the device):
  network   normalise + backbone + head, torch.compile (Inductor, freezing) -- the engine's own recipe
  op        ssdopt::decode_nms alone on that network's real head outputs
  both      the whole detector (network + op), compiled as one program, as the engine runs it
plus torchvision's eager model with its own post-processing under the full timing plan (>= 3 s and
>= 200 iterations). Each stage's error is recorded and the script goes on; the JSON is rewritten
after every stage, so a timeout still leaves what was measured. Engines, accuracy, batch-1 latency
and throughput come from the CLI (benchmarks/gpu_cli.sh).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_cuda_op() -> dict[str, Any]:
    """torch.ops.ssdopt.decode_nms with its CUDA kernel, through ssdopt's own builder."""
    import torch

    os.environ.setdefault("SSDOPT_NMS_CUDA", "1")
    os.environ.setdefault("SSDOPT_CUDA_ARCHS", "90")
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # DESIGN.md: the extension builds only with it
    from ssdopt.ops import library

    path = library.load_torch_ops()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ssdopt::decode_nms", "CUDA"):
        raise RuntimeError(f"{path}: ssdopt::decode_nms has no CUDA kernel registered")
    return {"library": str(path), "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}


def test_images(count: int, size: int, seed: int) -> Any:
    """float32 [count, 3, size, size] in [0, 1]: synthetic-shapes images (the model's own kind)."""
    import numpy as np
    import torch

    from ssdopt.data.synthetic import generate_image

    rng = np.random.default_rng(seed)
    pixels = [generate_image(rng, size)[0] for _ in range(count)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255).contiguous()


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
    from ssdopt.models.zoo import load_checkpoint, model_image_size

    out = Path(os.environ.get("OUT", "benchmarks/results"))
    checkpoint = Path(os.environ.get("CK", REPO / "data/reference/ssdlite320_shapes.safetensors"))
    deadline = time.monotonic() + float(os.environ.get("BUDGET_S", "380"))
    report: dict[str, Any] = {"script": "benchmarks/gpu_split.py", "checkpoint": str(checkpoint)}
    report["errors"] = {}

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".gpu_split.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out / "gpu_split.json")

    report["environment"] = load_cuda_op()
    model, meta = load_checkpoint(checkpoint)
    report["model"] = meta["model"]
    size = model_image_size(model)
    m = model.to("cuda").eval()
    image = [test_images(1, size, seed=4)[0].cuda()]
    with torch.no_grad():
        report["torchvision_eager_fp32_batch1"] = full_plan(lambda: m(image), 1)
    model.to("cpu")
    save()
    options = {**inductor_configs(False), "triton.cudagraphs": False}
    for precision in ("fp32", "fp16"):
        detector = detector_module(model, precision).cuda()
        for batch in (1, 32):
            stage = f"{precision} batch {batch}"
            if time.monotonic() > deadline - 60:
                report["errors"][stage] = "skipped: BUDGET_S spent"
                continue
            try:
                x = test_images(batch, size, seed=2).cuda()
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
            except Exception:  # noqa: BLE001 - recorded; the other stages still run
                report["errors"][stage] = traceback.format_exc()[-3000:]
                continue
            report.setdefault(precision, {})[str(batch)] = row
            save()
            print(
                f"{stage}: network {row['network']['median_ms']:.3f} ms, op {row['op']['median_ms']:.3f} ms,"
                f" both {row['both']['median_ms']:.3f} ms",
                flush=True,
            )
        del detector
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
