"""GPU benchmark of SSDDecodeNMS: torchvision SSD post-processing, torchvision decode + batched_nms, ours.

A = 3234 anchors (ssdlite320), C in {9, 91}, B in {1, 8, 32}; default attributes (score 0.01, IoU 0.45,
top-k 400, K 200). CUDA events around every iteration, median after warm-up; ours also replayed from a
CUDA graph. Slow baselines get fewer iterations (time-boxed; the count is recorded).

    python benchmarks/nms_gpu.py --out benchmarks/results/nms_gpu.json
    python benchmarks/nms_gpu.py --sanitizer-driver   # a few small calls, for compute-sanitizer

--real: the op on real head outputs instead (issue 13): the reference ssdlite320 of the shape classes
(C = 11, data/reference/ssdlite320_shapes.safetensors) and a torchvision ssdlite320 with 91 classes and
random weights (weights=None, weights_backbone=None, torch.manual_seed(0)), both run eagerly on seeded
synthetic-shapes images (ssdopt.data.synthetic) to get their head outputs; plus this script's seeded
synthetic head outputs at C = 91. B in {1, 32}. Per case: ours eager and CUDA-graph replay (CUDA events,
median), torchvision's postprocess_detections (time-boxed; skipped with --no-baseline), agreement of
the detections, and a torch.profiler split by kernel.

    python benchmarks/nms_gpu.py --real --out benchmarks/results/nms_gpu_real.json \
        [--merge-old OLD.json]   # OLD.json: the same mode run by an older kernel, for before/after
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssdopt.ops import decode_nms  # noqa: E402
from ssdopt.ops.library import load_torch_ops  # noqa: E402

KERNEL_SOURCE = (
    Path(__file__).resolve().parents[1] / "plugins" / "nms" / "src" / "cuda" / "decode_nms_cuda.cu"
)
NUM_ANCHORS = 3234
ATTRS = {"score_threshold": 0.01, "iou_threshold": 0.45, "pre_nms_top_k": 400, "max_detections": 200}


def head_outputs(
    batch: int, num_classes: int, seed: int, device: str, num_anchors: int = NUM_ANCHORS
) -> tuple[torch.Tensor, ...]:
    """Seeded SSD-head-like outputs: deltas [B, A, 4], logits [B, A, C], anchors [A, 4] (320 x 320 image)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_anchors, 2, generator=g) * 320
    sizes = torch.exp(torch.empty(num_anchors, 2).uniform_(math.log(8), math.log(200), generator=g))
    anchors = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    deltas = torch.randn(batch, num_anchors, 4, generator=g)
    logits = torch.randn(batch, num_anchors, num_classes, generator=g) * 3
    logits[..., 0] += 2
    return deltas.to(device), logits.to(device), anchors.to(device)


def ssd_model(num_classes: int, device: str) -> torchvision.models.detection.SSD:
    """Only for its postprocess_detections (random weights, never run)."""
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        score_thresh=ATTRS["score_threshold"],
        nms_thresh=ATTRS["iou_threshold"],
        detections_per_img=ATTRS["max_detections"],
        topk_candidates=ATTRS["pre_nms_top_k"],
    )
    return model.eval().to(device)


def torchvision_postprocess(model, deltas, logits, anchors):  # noqa: ANN001, ANN201
    batch = deltas.shape[0]
    return model.postprocess_detections(
        {"bbox_regression": deltas, "cls_logits": logits}, [anchors] * batch, [(320, 320)] * batch
    )


def torchvision_vectorized(coder, deltas, logits, anchors):  # noqa: ANN001, ANN201
    """Same semantics with batched tensor ops: one softmax and decode, per-class top-k by torch.topk,
    then torchvision.ops.batched_nms per image."""
    scores = torch.softmax(logits, dim=-1)[..., 1:]  # [B, A, C-1]
    batch, num_anchors, classes = scores.shape
    boxes = coder.decode_single(deltas.reshape(-1, 4), anchors.repeat(batch, 1)).reshape(
        batch, num_anchors, 4
    )
    boxes = torchvision.ops.clip_boxes_to_image(boxes, (320, 320))
    masked = torch.where(scores > ATTRS["score_threshold"], scores, torch.full_like(scores, -1.0))
    k = min(ATTRS["pre_nms_top_k"], num_anchors)
    top_scores, top_idx = masked.transpose(1, 2).topk(k, dim=2)  # [B, C-1, k]
    results = []
    for b in range(batch):
        keep = top_scores[b] > ATTRS["score_threshold"]
        labels = torch.arange(1, classes + 1, device=scores.device)[:, None].expand(-1, k)[keep]
        cand_scores = top_scores[b][keep]
        cand_boxes = boxes[b][top_idx[b][keep]]
        kept = torchvision.ops.batched_nms(cand_boxes, cand_scores, labels, ATTRS["iou_threshold"])
        kept = kept[: ATTRS["max_detections"]]
        results.append((cand_boxes[kept], cand_scores[kept], labels[kept]))
    return results


def ours(deltas, logits, anchors):  # noqa: ANN001, ANN201
    return decode_nms(deltas, logits, anchors, **ATTRS)


def time_cuda(fn, min_iters: int, max_iters: int, budget_s: float, warmup: int = 10) -> tuple[float, int]:  # noqa: ANN001
    """Median milliseconds of fn() over CUDA-event-timed iterations (count time-boxed to budget_s)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    single = time.perf_counter() - t0
    iters = int(max(min_iters, min(max_iters, budget_s / max(single, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=False):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=False)), iters


def graph_replay(deltas, logits, anchors):  # noqa: ANN001, ANN201
    """Captures ours in a CUDA graph; returns the replay function."""
    static = (deltas.clone(), logits.clone(), anchors)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            ours(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours(*static)
    return graph.replay


def agreement(model, deltas, logits, anchors) -> dict:  # noqa: ANN001
    """Detections per image of torchvision vs ours, and the worst score difference in matched order."""
    ref = torchvision_postprocess(model, deltas, logits, anchors)
    num, _, scores, _ = ours(deltas, logits, anchors)
    counts_equal = [int(num[b]) == ref[b]["scores"].numel() for b in range(len(ref))]
    diffs = [
        float((scores[b, : int(num[b])] - ref[b]["scores"]).abs().max())
        if counts_equal[b] and int(num[b])
        else 0.0
        for b in range(len(ref))
    ]
    return {"num_detections_equal": all(counts_equal), "max_sorted_score_diff": max(diffs)}


def benchmark(classes: list[int], batches: list[int], baseline_budget_s: float, iters: int) -> list[dict]:
    rows = []
    coder = torchvision.models.detection._utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    for num_classes in classes:
        model = ssd_model(num_classes, "cuda")
        for batch in batches:
            deltas, logits, anchors = head_outputs(
                batch, num_classes, seed=batch * 100 + num_classes, device="cuda"
            )
            row = {"A": NUM_ANCHORS, "C": num_classes, "B": batch}
            row["torchvision_postprocess_ms"], row["torchvision_postprocess_iters"] = time_cuda(
                functools.partial(torchvision_postprocess, model, deltas, logits, anchors),
                5,
                iters,
                baseline_budget_s,
                2,
            )
            row["torchvision_batched_nms_ms"], row["torchvision_batched_nms_iters"] = time_cuda(
                functools.partial(torchvision_vectorized, coder, deltas, logits, anchors),
                5,
                iters,
                baseline_budget_s,
                2,
            )
            row["ours_ms"], row["ours_iters"] = time_cuda(
                functools.partial(ours, deltas, logits, anchors), iters, iters, 1e9
            )
            replay = graph_replay(deltas, logits, anchors)
            row["ours_graph_ms"], row["ours_graph_iters"] = time_cuda(replay, iters, iters, 1e9)
            row["speedup_vs_postprocess"] = row["torchvision_postprocess_ms"] / row["ours_ms"]
            row["speedup_vs_batched_nms"] = row["torchvision_batched_nms_ms"] / row["ours_ms"]
            row.update(agreement(model, deltas, logits, anchors))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets for B=1, C=91 and the B=32 / B=1 cost ratio (eager and graph)."""

    def row(c: int, b: int) -> dict | None:
        return next((r for r in rows if r["C"] == c and r["B"] == b), None)

    out = {}
    one, many = row(91, 1), row(91, 32)
    if one:
        out["speedup_vs_postprocess_B1_C91"] = one["speedup_vs_postprocess"]
        out["speedup_target_20x_met"] = one["speedup_vs_postprocess"] >= 20
        out["latency_us_B1_C91"] = one["ours_ms"] * 1000
        out["latency_us_B1_C91_graph"] = one["ours_graph_ms"] * 1000
        out["latency_target_100us_met"] = one["ours_ms"] * 1000 <= 100
        out["latency_target_100us_met_graph"] = one["ours_graph_ms"] * 1000 <= 100
    if one and many:
        out["B32_over_B1"] = many["ours_ms"] / one["ours_ms"]
        out["B32_over_B1_graph"] = many["ours_graph_ms"] / one["ours_graph_ms"]
        out["batch_target_8x_met"] = out["B32_over_B1"] <= 8
        out["batch_target_8x_met_graph"] = out["B32_over_B1_graph"] <= 8
    return out


def kernel_breakdown(batch: int, num_classes: int, iters: int = 50) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel of ours (torch.profiler / CUPTI)."""
    deltas, logits, anchors = head_outputs(batch, num_classes, seed=1, device="cuda")
    for _ in range(5):
        ours(deltas, logits, anchors)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            ours(deltas, logits, anchors)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "")
            totals[name] = totals.get(name, 0.0) + event.device_time / iters
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# ---- --real: head outputs of real models -----------------------------------------------------------
REFERENCE_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "data" / "reference" / "ssdlite320_shapes.safetensors"
)
REAL_BATCHES = (1, 32)


def synthetic_images(count: int, size: int, seed: int = 2) -> torch.Tensor:
    """float32 [count, 3, size, size] in [0, 1] from the synthetic-shapes generator (seeded)."""
    import numpy as np

    from ssdopt.data.synthetic import generate_image

    rng = np.random.default_rng(seed)
    pixels = [generate_image(rng, size)[0] for _ in range(count)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255).contiguous()


def model_head_outputs(model, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Eager fp32 normalise + backbone + head of a torchvision SSD: deltas, logits, anchors (on the GPU)."""
    from torchvision.models.detection.image_list import ImageList

    model = model.to("cuda").eval()
    size = images.shape[-1]
    with torch.no_grad():
        x = torch.stack([model.transform.normalize(i) for i in images.to("cuda")])
        features = list(model.backbone(x).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(x, [(size, size)] * len(x)), features)[0]
    model.to("cpu")
    return head["bbox_regression"].contiguous(), head["cls_logits"].contiguous(), anchors.float().contiguous()


def real_cases() -> list[tuple[str, str, int, tuple[torch.Tensor, ...]]]:
    """(case, description, batch, head outputs) for every case of --real."""
    from ssdopt.models.zoo import POSTPROCESS_DEFAULTS, build_model, load_checkpoint

    expected = {
        "score_thresh": ATTRS["score_threshold"],
        "nms_thresh": ATTRS["iou_threshold"],
        "topk_candidates": ATTRS["pre_nms_top_k"],
        "detections_per_img": ATTRS["max_detections"],
    }
    assert all(POSTPROCESS_DEFAULTS[k] == v for k, v in expected.items()), POSTPROCESS_DEFAULTS
    images = synthetic_images(max(REAL_BATCHES), 320)
    cases = []
    reference, meta = load_checkpoint(REFERENCE_CHECKPOINT)
    outputs = model_head_outputs(reference, images)
    for b in REAL_BATCHES:
        cases.append(
            (
                "ssdlite_shapes_C11",
                f"reference checkpoint ({meta['model']}, C={meta['num_classes']})",
                b,
                tuple(t[:b].contiguous() if t.dim() == 3 else t for t in outputs),
            )
        )
    torch.manual_seed(0)
    random91 = build_model("ssdlite320_mobilenet_v3_large", 91)  # weights=None, weights_backbone=None
    outputs = model_head_outputs(random91, images)
    for b in REAL_BATCHES:
        cases.append(
            (
                "ssdlite_random_C91",
                "torchvision ssdlite320, 91 classes, random weights (seed 0)",
                b,
                tuple(t[:b].contiguous() if t.dim() == 3 else t for t in outputs),
            )
        )
    for b in REAL_BATCHES:
        cases.append(
            (
                "synthetic_C91",
                "this script's seeded synthetic head outputs, C=91",
                b,
                head_outputs(b, 91, seed=b * 100 + 91, device="cuda"),
            )
        )
    return cases


def kernel_split(deltas, logits, anchors, iters: int = 50) -> dict[str, float]:  # noqa: ANN001
    """Mean GPU microseconds per call of each kernel of ours on these inputs (torch.profiler / CUPTI)."""
    for _ in range(5):
        ours(deltas, logits, anchors)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            ours(deltas, logits, anchors)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "")
            name = name.replace("ssdopt::nms::", "")
            totals[name] = round(totals.get(name, 0.0) + event.device_time / iters, 2)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def raw_op_arguments() -> list:
    """ATTRS (and DESIGN.md's defaults for the rest) as torch.ops.ssdopt.decode_nms takes them."""
    return [
        ATTRS["score_threshold"],
        ATTRS["iou_threshold"],
        ATTRS["pre_nms_top_k"],
        ATTRS["max_detections"],
        [10.0, 10.0, 5.0, 5.0],
        True,
        0,
        False,
        320,
        320,
    ]


def candidates_per_image(logits: torch.Tensor) -> float:
    scores = torch.softmax(logits.float(), -1)[..., 1:]
    return float((scores > ATTRS["score_threshold"]).sum().item()) / logits.shape[0]


def real_benchmark(iters: int, baseline_budget_s: float, baseline: bool) -> list[dict]:
    rows = []
    models = {11: ssd_model(11, "cuda"), 91: ssd_model(91, "cuda")}  # only their postprocess_detections
    for case, description, batch, (deltas, logits, anchors) in real_cases():
        num_classes = logits.shape[-1]
        row = {
            "case": case,
            "description": description,
            "B": batch,
            "C": num_classes,
            "A": anchors.shape[0],
            "candidates_per_image": candidates_per_image(logits),
        }
        row["ours_us"] = (
            1000 * time_cuda(functools.partial(ours, deltas, logits, anchors), iters, iters, 1e9)[0]
        )
        replay = graph_replay(deltas, logits, anchors)
        row["ours_graph_us"] = 1000 * time_cuda(replay, iters, iters, 1e9)[0]
        row["ours_us_repeat"] = (
            1000 * time_cuda(functools.partial(ours, deltas, logits, anchors), iters, iters, 1e9)[0]
        )
        row["ours_graph_us_repeat"] = 1000 * time_cuda(replay, iters, iters, 1e9)[0]
        # The C++ op without ssdopt.ops.decode_nms's Python argument checks (eager host cost).
        raw = functools.partial(torch.ops.ssdopt.decode_nms, deltas, logits, anchors, *raw_op_arguments())
        row["ours_raw_op_us"] = 1000 * time_cuda(raw, iters, iters, 1e9)[0]
        num = ours(deltas, logits, anchors)[0]
        row["detections_per_image"] = float(num.float().mean())
        if baseline:
            model = models[num_classes]
            row["torchvision_postprocess_ms"], row["torchvision_postprocess_iters"] = time_cuda(
                functools.partial(torchvision_postprocess, model, deltas, logits, anchors),
                2,
                iters,
                baseline_budget_s,
                1,
            )
            row["speedup_vs_postprocess"] = row["torchvision_postprocess_ms"] * 1000 / row["ours_graph_us"]
            row.update(agreement(model, deltas, logits, anchors))
        row["kernels_us"] = kernel_split(deltas, logits, anchors)
        if case == "ssdlite_shapes_C11" and batch == 1:  # the same call with the quota of every class = 400
            os.environ["SSDOPT_NMS_CUDA_QUOTA"] = "400"
            row["quota400_graph_us"] = (
                1000 * time_cuda(graph_replay(deltas, logits, anchors), iters, iters, 1e9)[0]
            )
            row["quota400_kernels_us"] = kernel_split(deltas, logits, anchors)
            os.environ.pop("SSDOPT_NMS_CUDA_QUOTA")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


REAL_TARGETS_US = {
    ("ssdlite_shapes_C11", 1): 60,
    ("ssdlite_random_C91", 1): 100,
    ("synthetic_C91", 1): 100,
    ("ssdlite_random_C91", 32): 200,
    ("synthetic_C91", 32): 200,
}


def real_summary(rows: list[dict], old_rows: list[dict] | None) -> dict:
    old = {(r["case"], r["B"]): r for r in old_rows or []}
    out = {}
    for r in rows:
        key = (r["case"], r["B"])
        entry = {"eager_us": round(r["ours_us"], 1), "graph_us": round(r["ours_graph_us"], 1)}
        if key in REAL_TARGETS_US:
            entry["target_us"] = REAL_TARGETS_US[key]
            entry["target_met_graph"] = r["ours_graph_us"] <= REAL_TARGETS_US[key]
            entry["target_met_eager"] = r["ours_us"] <= REAL_TARGETS_US[key]
        if key in old:
            entry["before_eager_us"] = round(old[key]["ours_us"], 1)
            entry["before_graph_us"] = round(old[key]["ours_graph_us"], 1)
            entry["graph_speedup_vs_before"] = round(old[key]["ours_graph_us"] / r["ours_graph_us"], 2)
        out[f"{r['case']}_B{r['B']}"] = entry
    return out


def sanitizer_driver() -> None:
    """Small calls through every kernel path: class-wise, agnostic, multi-tile sorts (A > 4096, kept > 4096),
    NMS lists too long for shared memory, float16, sigmoid."""
    cases = [
        (2, 91, 3234, {}, None),  # fast path (class_kernel + final_kernel), quota active
        (1, 9, 3234, {"class_agnostic": True}, None),  # general path from here ...
        (1, 5, 3234, {"score_threshold": 0.0, "pre_nms_top_k": 3000, "max_detections": 3000}, None),
        (1, 3, 9000, {"score_threshold": 0.0, "iou_threshold": 0.8, "max_detections": 1000}, None),  # fast
        (2, 21, 3234, {"softmax": False, "background_class": -1, "score_threshold": 0.3}, None),  # fast
        (2, 91, 3234, {}, "3"),  # fast, quota 3: the final kernel redoes classes
        (1, 11, 3234, {"score_threshold": 0.0}, "5"),  # fast, 3234 candidates per class, redone
        (6, 91, 3234, {}, "5"),  # fast with B * C > 512 (256-thread blocks), redone
    ]
    for batch, num_classes, num_anchors, attrs, quota in cases:
        deltas, logits, anchors = head_outputs(
            batch, num_classes, seed=7, device="cuda", num_anchors=num_anchors
        )
        if quota is not None:
            os.environ["SSDOPT_NMS_CUDA_QUOTA"] = quota
        for dtype in (torch.float32, torch.float16):
            out = decode_nms(deltas.to(dtype), logits.to(dtype), anchors, **{**ATTRS, **attrs})
            torch.cuda.synchronize()
            print(batch, num_classes, attrs, quota, dtype, out[0].tolist(), flush=True)
        os.environ.pop("SSDOPT_NMS_CUDA_QUOTA", None)


def environment(library: Path | None) -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "library": str(library),
        "kernel_source_sha256": hashlib.sha256(KERNEL_SOURCE.read_bytes()).hexdigest(),
        "path_env": os.environ.get("SSDOPT_NMS_CUDA_PATH", ""),
    }


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--classes", type=int, nargs="+", default=[9, 91])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--baseline-budget-s", type=float, default=1.0)
    parser.add_argument("--sanitizer-driver", action="store_true")
    parser.add_argument("--real", action="store_true", help="real models' head outputs (see above)")
    parser.add_argument("--no-baseline", action="store_true", help="--real: skip torchvision's postprocess")
    parser.add_argument("--merge-old", type=Path, default=None, help="--real: JSON of an older kernel's run")
    parser.add_argument("--label", default="", help="--real: recorded as is (e.g. 'before', 'after')")
    args = parser.parse_args()
    t0 = time.time()
    library = load_torch_ops()
    if args.sanitizer_driver:
        sanitizer_driver()
        return
    if args.real:
        out = args.out or Path("benchmarks/results/nms_gpu_real.json")
        rows = real_benchmark(args.iters, args.baseline_budget_s, not args.no_baseline)
        old = json.loads(args.merge_old.read_text()) if args.merge_old and args.merge_old.is_file() else None
        result = {
            "benchmark": "SSDDecodeNMS GPU on real head outputs",
            "label": args.label,
            "command": "python " + " ".join(sys.argv),
            **environment(library),
            "attributes": ATTRS,
            "timing": f"CUDA events around each call, median of {args.iters} after warm-up, twice "
            "(ours_us / ours_us_repeat); graph = replay of one captured call; torchvision time-boxed",
            "rows": rows,
            "summary": real_summary(rows, old["rows"] if old else None),
            "before": old,
            "seconds": round(time.time() - t0, 1),
        }
        write_json(out, result)
        print(json.dumps(result["summary"], indent=1))
        return
    rows = benchmark(args.classes, args.batches, args.baseline_budget_s, args.iters)
    result = {
        "benchmark": "SSDDecodeNMS GPU",
        "command": "python " + " ".join(sys.argv),
        **environment(library),
        "attributes": ATTRS,
        "timing": "CUDA events around each iteration, median; warm-up first; baselines time-boxed",
        "rows": rows,
        "targets": targets(rows),
        "kernel_breakdown_us": {f"B{b}_C{c}": kernel_breakdown(b, c) for c in (9, 91) for b in (1, 32)},
        "select_path": os.environ.get("SSDOPT_NMS_CUDA_SELECT", "1") != "0",
        "seconds": round(time.time() - t0, 1),
    }
    write_json(args.out or Path("benchmarks/results/nms_gpu.json"), result)
    print(json.dumps({"targets": result["targets"], "kernels": result["kernel_breakdown_us"]}, indent=2))


if __name__ == "__main__":
    main()
