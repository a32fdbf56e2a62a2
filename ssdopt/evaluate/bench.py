"""`ssdopt bench`: every engine and its peers measured in one run, with an honest status per row.

Rows, in order: torchvision eager fp32 with its own post-processing (the baseline every speed-up
refers to), `torch.compile` default of the same model, ONNX Runtime fp32 of the exported head with the
reference decode (the accuracy reference for delta_map and agreement), then one row per backend x
precision built from the export with the fused SSDDecodeNMS node, then any extra engine directories.

Status legend (the Ultralytics convention):
    ✅ built and validated · ❎ built, but mAP dropped beyond the budget or agreement is below the
    threshold · ❌ failed to build (the reason is in the row) · ❔ built, but not validated: the
    ONNX Runtime fp32 reference itself failed (it is always measured, `--peers` or not).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.backends.base import BuildSpec, Engine, get_backend
from ssdopt.backends.device import cpu_info
from ssdopt.data.coco import CocoDataset, load_coco, load_split
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.engine import agreement, engine_latency, evaluate_engine, validation_problems
from ssdopt.evaluate.latency import LatencyStats, TimingPlan, time_cuda, time_host
from ssdopt.fileio import sha256_file

VALIDATED, FAILED_VALIDATION, FAILED_BUILD, NOT_VALIDATED = "✅", "❎", "❌", "❔"
STATUS_NAMES = {
    VALIDATED: "built and validated",
    FAILED_VALIDATION: "built but failed validation",
    FAILED_BUILD: "failed to build",
    NOT_VALIDATED: "built, not validated (no fp32 reference)",
}
BASELINE = ("torch-eager", "fp32")
REFERENCE = ("onnxruntime", "fp32")  # graph "head+reference-decode": the delta_map reference
PEERS = ("torch-eager", "torch-compile", "onnxruntime-fp32")
PEER_ROUTE_NAMES = ("openvino-nncf", "onnxruntime-quantize-static")  # = ssdopt.evaluate.peers.PEER_ROUTES
# plus the routes of ssdopt.evaluate.peers (they need the DVC calibration set): params bench.peers
# torch.compile modes a PyTorch user would pick on a GPU: peer name -> (mode, what is compiled). "detector"
# is the whole torchvision SSD, post-processing included; "network" is what a user falls back to when that
# fails (torch 2.11 on the H200, RESULTS.md): backbone and head compiled, anchors + post-processing eager.
COMPILE_PEERS: dict[str, tuple[str | None, str]] = {
    "torch-compile": (None, "detector"),
    "torch-compile-reduce-overhead": ("reduce-overhead", "detector"),
    "torch-compile-max-autotune": ("max-autotune", "detector"),
    "torch-compile-network-reduce-overhead": ("reduce-overhead", "network"),
    "torch-compile-network-max-autotune": ("max-autotune", "network"),
}
DEVICES = ("cpu", "cuda")
NMS_GRAPH = "model_nms.onnx"
GRAPH_MARKER = "graph.json"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; defaults are params.yaml section `bench`."""

    backends: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt", "torch-aoti")
    precisions: tuple[str, ...] = ("fp32", "int8")
    peers: tuple[str, ...] = PEERS
    batch: int = 1
    limit: int | None = 200
    plan: TimingPlan = field(default_factory=TimingPlan)
    budget_points: float = 1.0  # mAP drop (points) still validated
    min_agreement: float = 0.9  # share of the fp32 reference's confident boxes reproduced
    compile_timeout_s: float = 900.0
    eval_batch: int = 8
    spec: BuildSpec = field(default_factory=BuildSpec)
    extra_engines: tuple[Path, ...] = ()
    progress: bool = True
    device: str = "cpu"  # where the torch peers and the engines run; the ORT fp32 reference stays on CPU
    split: bool = True  # CPU: network alone vs the op directly vs torchvision post-processing (time_split)
    split_rounds: int = 3  # interleaved (engine end to end, network alone) pairs per fused fp32 engine
    throughput_batches: tuple[int, ...] = ()  # best images/s over these batch sizes (throughput_sweep)
    throughput_streams: tuple[int, ...] = ()  # CPU: requests in flight at the best batch (streams.py)
    rounds: int = 1  # >= 2: every CPU row timed again in interleaved rounds, ratios per round (interleave)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise SsdoptError(f"--device {self.device}", f"one of {', '.join(DEVICES)}", "fix the flag")
        known = ("torch-eager", "onnxruntime-fp32", *COMPILE_PEERS, *PEER_ROUTE_NAMES)
        unknown = [p for p in self.peers if p not in known]
        if unknown:
            raise SsdoptError(
                f"--peers {','.join(unknown)}",
                f"peers among {', '.join(known)}",
                "fix the flag or params.yaml bench.peers / bench.gpu.peers",
            )


@dataclass
class BenchContext:
    """The inputs every row shares: the model, the evaluation subset and the exported graphs."""

    model: Any  # torchvision SSD, eval mode, CPU
    dataset: CocoDataset  # the first `limit` images of the split
    export_dir: Path  # model.onnx, model_unfolded.onnx, anchors.npy, export.json
    nms_graph: Path  # model.onnx + SSDDecodeNMS node
    engines_dir: Path
    image_size: int
    checkpoint: Path | None = None  # torch.compile runs from it in a fresh process


def _row(backend: str, precision: str, graph: str, device: str, batch: int) -> dict[str, Any]:
    return {
        "backend": backend,
        "precision": precision,
        "graph": graph,
        "device": device,
        "batch": batch,
        "status": FAILED_BUILD,
        "status_name": STATUS_NAMES[FAILED_BUILD],
        "reason": "",
        "size_mb": None,
        "build_s": None,
        "map": None,
        "delta_map": None,
        "agreement": None,
        "p50_ms": None,
        "p99_ms": None,
        "throughput_ips": None,
        "speedup": None,
        "latency": None,
        "engine": None,
    }


def _set_latency(row: dict[str, Any], stats: LatencyStats) -> None:
    row.update(p50_ms=stats.median_ms, p99_ms=stats.p99_ms, throughput_ips=stats.throughput_ips)
    row["latency"] = stats.as_dict()


def _cpu_name() -> str:
    return f"CPU {cpu_info().get('name')}"


def subset(ds: CocoDataset, limit: int | None) -> CocoDataset:
    """The first `limit` images of `ds` with their annotations; refuses a split without annotations."""
    if not ds.annotations:
        raise SsdoptError(
            ds.path,
            "a COCO split with annotations (mAP needs ground truth)",
            "pass the val or test split (e.g. data/synthetic/val.json), not an image list",
        )
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise SsdoptError(f"--limit {limit}", "a number of images >= 0 (0: all)", "pass e.g. --limit 200")
    if not limit:
        return ds
    keep = {im.id for im in ds.images[:limit]}
    return CocoDataset(
        path=ds.path,
        image_dir=ds.image_dir,
        images=ds.images[:limit],
        annotations=[a for a in ds.annotations if a.image_id in keep],
        categories=ds.categories,
    )


def _check_classes(model_classes: list[str], ds: CocoDataset, source: str) -> None:
    if list(model_classes)[1:] != ds.class_names()[1:]:  # label 0 is background, whatever its name
        raise SsdoptError(
            source,
            f"a model of the classes of {ds.path} ({ds.class_names()[1:]}), got {list(model_classes)[1:]}",
            "benchmark on the dataset the checkpoint was trained for",
        )


# ---------------------------------------------------------------- graphs


def export_for_bench(model: Any, meta: dict[str, Any], checkpoint: Path | None, work: Path) -> Path:
    """work/onnx: the export of `model`, reused when export.json names the same checkpoint bytes."""
    from ssdopt.export import export_onnx

    out = work / "onnx"
    info = {"model": meta.get("model"), "class_names": meta.get("class_names")}
    if checkpoint is not None:
        info["checkpoint"] = {"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
        record = out / "export.json"
        if record.is_file():
            previous = json.loads(record.read_text()).get("checkpoint") or {}
            if previous.get("sha256") == info["checkpoint"]["sha256"]:
                return out
    return export_onnx(model, out, meta=info)


def graph_with_decode_nms(export_dir: Path, work: Path) -> Path:
    """The export plus the SSDDecodeNMS node (attributes from export.json), in a directory beside copies
    of the export's sidecars so engines built from it carry export.json and the fusion reference."""
    import onnx

    from ssdopt.data import atomic_output_dir
    from ssdopt.ops.onnx_node import add_decode_nms_node

    export_sha = sha256_file(export_dir / "model.onnx")
    out = work / f"graph-{export_sha[:12]}"
    if (out / GRAPH_MARKER).is_file() and (out / NMS_GRAPH).is_file():
        return out / NMS_GRAPH
    info = json.loads((export_dir / "export.json").read_text())
    post = info["postprocess"]
    size = int(info["image_size"])
    anchors = np.load(export_dir / "anchors.npy")
    graph = add_decode_nms_node(
        onnx.load(str(export_dir / "model.onnx")),
        anchors,
        score_threshold=float(post["score_threshold"]),
        iou_threshold=float(post["iou_threshold"]),
        pre_nms_top_k=int(post["pre_nms_top_k"]),
        max_detections=int(post["max_detections"]),
        box_weights=tuple(info["box_coder_weights"]),
        softmax=post.get("score_activation", "softmax") == "softmax",
        background_class=int(post.get("background_class", 0)),
        image_height=size,
        image_width=size,
    )
    with atomic_output_dir(out, GRAPH_MARKER) as tmp:
        onnx.save(graph, str(tmp / NMS_GRAPH))
        for name in ("export.json", "anchors.npy", "model_unfolded.onnx"):
            shutil.copyfile(export_dir / name, tmp / name)
        (tmp / GRAPH_MARKER).write_text(json.dumps({"export_sha256": export_sha}) + "\n")
    return out / NMS_GRAPH


# ---------------------------------------------------------------- torch peers


def _torch_images(size: int, batch: int, seed: int = 0) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return list(torch.rand(batch, 3, size, size, generator=generator))


def _torch_predict(
    model: Any, ctx: BenchContext, batch_size: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    from ssdopt.evaluate.accuracy import predict_dataset

    return predict_dataset(model, ctx.dataset, batch_size=batch_size, device=device, progress=False)


def _device_name(device: str) -> str:
    if device == "cuda":
        from ssdopt.backends.device import cuda_info

        return (cuda_info() or {}).get("name") or "cuda"
    return _cpu_name()


def _time_torch(fn: Callable[[], object], device: str, plan: TimingPlan, batch: int) -> LatencyStats:
    """Host clock on the CPU; CUDA events on the GPU (images resident there)."""
    return time_cuda(fn, plan, batch) if device == "cuda" else time_host(fn, plan, batch)


def _map(ctx: BenchContext, detections: list[dict[str, Any]]) -> float | None:
    from ssdopt.evaluate.accuracy import coco_evaluate

    return coco_evaluate(ctx.dataset, detections)["map"]


def _param_mb(model: Any) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def eager_row(ctx: BenchContext, cfg: BenchConfig) -> dict[str, Any]:
    """torchvision eager fp32, its own transform and post-processing: the baseline."""
    import copy

    import torch

    row = _row("torch-eager", "fp32", "torchvision SSD", _device_name(cfg.device), cfg.batch)
    model = ctx.model if cfg.device == "cpu" else copy.deepcopy(ctx.model).to(cfg.device)
    with torch.inference_mode():
        detections = _torch_predict(model, ctx, cfg.eval_batch, cfg.device)
        images = [i.to(cfg.device) for i in _torch_images(ctx.image_size, cfg.batch)]
        stats = _time_torch(lambda: model(images), cfg.device, cfg.plan, cfg.batch)
    row.update(
        size_mb=_param_mb(ctx.model),
        build_s=0.0,
        status=VALIDATED,
        detections=detections,
        map=_map(ctx, detections),
    )
    _set_latency(row, stats)
    return row


def _cuda_graph_steps_class() -> type:
    import torch

    class CudaGraphSteps(torch.nn.Module):
        """reduce-overhead replays CUDA graphs whose outputs the next replay overwrites: each call of the
        model is one step (PyTorch's documented fix; without it the network route fails on the GPU)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: Any) -> Any:
            torch.compiler.cudagraph_mark_step_begin()
            return self.inner(images)

    return CudaGraphSteps


def _compile_child(
    checkpoint: str,
    dataset_json: str,
    limit: int | None,
    cfg: BenchConfig,
    pipe: Any,
    mode: str | None = None,
    scope: str = "detector",
) -> None:
    """Runs in a fresh (spawned) process: a fork after torch used its thread pool hangs (measured), and
    a compile that takes too long must be killable."""
    try:
        import torch

        from ssdopt.models.zoo import load_checkpoint, model_image_size

        model, _ = load_checkpoint(checkpoint)
        model = model.eval().to(cfg.device)
        ds = subset(load_coco(Path(dataset_json)), limit)
        size = model_image_size(model)
        start = time.perf_counter()
        if scope == "network":  # backbone and head compiled in place; the model's own forward around them
            model.backbone = torch.compile(model.backbone, mode=mode)
            model.head = torch.compile(model.head, mode=mode)
            target = model
        else:
            target = torch.compile(model, mode=mode)

        # eval(): predict_dataset restores the training flag it found, and a new module starts in training
        compiled = _cuda_graph_steps_class()(target).eval() if mode == "reduce-overhead" else target

        with torch.inference_mode():
            images = [i.to(cfg.device) for i in _torch_images(size, cfg.batch)]
            compiled(images)
            build_s = time.perf_counter() - start
            from ssdopt.evaluate.accuracy import predict_dataset

            detections = predict_dataset(
                compiled, ds, batch_size=cfg.batch, device=cfg.device, progress=False
            )
            stats = _time_torch(lambda: compiled(images), cfg.device, cfg.plan, cfg.batch)
        pipe.send({"ok": True, "build_s": build_s, "detections": detections, "latency": stats.as_dict()})
    except BaseException as exc:  # noqa: BLE001 - reported as the row's reason
        pipe.send({"ok": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
    finally:
        pipe.close()


def compile_row(ctx: BenchContext, cfg: BenchConfig, peer: str = "torch-compile") -> dict[str, Any]:
    """`torch.compile` of the whole torchvision detector (post-processing included) in one of its modes;
    ❌ with the reason if it fails or exceeds the timeout (the build time is bounded, not unlimited)."""
    mode, scope = COMPILE_PEERS[peer]
    label = f"torchvision SSD, torch.compile {mode or 'default'}"
    if scope == "network":
        label += " of backbone + head (anchors, post-processing eager)"
    row = _row(peer, "fp32", label, _device_name(cfg.device), cfg.batch)
    if ctx.checkpoint is None:
        row["reason"] = "torch.compile runs in a fresh process from a checkpoint file; none was given"
        return row
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    args = (str(ctx.checkpoint), str(ctx.dataset.path), len(ctx.dataset.images), cfg, send, mode, scope)
    child = context.Process(target=_compile_child, args=args, daemon=True)
    child.start()
    send.close()
    result = receive.recv() if receive.poll(cfg.compile_timeout_s) else None
    if result is None:
        child.kill()
        row["reason"] = (
            f"torch.compile did not finish within {cfg.compile_timeout_s:g} s (bench.compile_timeout_s)"
        )
    child.join(timeout=10)
    if result is None:
        return row
    if not result["ok"]:
        row["reason"] = f"torch.compile failed: {result['reason']}"
        return row
    row.update(
        size_mb=_param_mb(ctx.model),
        build_s=result["build_s"],
        detections=result["detections"],
        map=_map(ctx, result["detections"]),
    )
    row["status"] = VALIDATED  # validated below against the reference like every other row
    _set_latency(row, LatencyStats(**result["latency"]))
    return row


# ---------------------------------------------------------------- peer routes (ssdopt.evaluate.peers)


def _predict_head_route(
    head: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    decode: Callable[[np.ndarray, np.ndarray], Any],
    ctx: BenchContext,
    batch_size: int,
) -> list[dict[str, Any]]:
    """COCO detections of a network + Python post-processing route over the bench subset."""
    from ssdopt.data.images import read_image
    from ssdopt.evaluate.accuracy import detections_to_coco, label_to_category

    size, label_map, out = ctx.image_size, label_to_category(ctx.dataset), []
    images = ctx.dataset.images
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = np.stack([read_image(ctx.dataset.image_path(im), size=size) for im in chunk])
        dets = decode(*head(batch))
        for i, im in enumerate(chunk):
            n = int(dets.num_detections[i])
            scale = np.array([im.width / size, im.height / size] * 2, dtype=np.float32)
            out += detections_to_coco(
                im.id, dets.boxes[i, :n] * scale, dets.scores[i, :n], dets.labels[i, :n], label_map
            )
    return out


def peer_route_row(ctx: BenchContext, cfg: BenchConfig, name: str) -> dict[str, Any]:
    """A peer route (PEER_ROUTES): its own network runtime, torchvision post-processing in Python;
    mAP audited and latency end to end like every engine; ❌ with the reason when it cannot be built."""
    import torch

    from ssdopt.evaluate.peers import PEER_ROUTES, torchvision_postprocess

    row = _row(name, "int8", "peer route", _cpu_name(), cfg.batch)
    try:
        route = PEER_ROUTES[name](ctx.export_dir, cfg.spec.calibration, ctx.image_size, ctx.engines_dir)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is a ❌ row, not a crash
        row["reason"] = _reason(exc)
        return row
    anchors = torch.from_numpy(np.load(ctx.export_dir / "anchors.npy"))

    def decode(deltas: np.ndarray, logits: np.ndarray) -> Any:
        return torchvision_postprocess(ctx.model, anchors, deltas, logits, ctx.image_size)

    images = np.random.default_rng(0).random((cfg.batch, 3, ctx.image_size, ctx.image_size), dtype=np.float32)
    with torch.inference_mode():
        detections = _predict_head_route(route.head, decode, ctx, cfg.eval_batch)
        stats = time_host(lambda: decode(*route.head(images)), cfg.plan, cfg.batch)
        head_stats = time_host(lambda: route.head(images), cfg.plan, cfg.batch)
    row.update(
        status=VALIDATED,
        graph=route.label,
        size_mb=route.size_mb,
        build_s=route.build_s,
        detections=detections,
        map=_map(ctx, detections),
        peer=route.metadata,
        network_p50_ms=head_stats.median_ms,
    )
    _set_latency(row, stats)
    return row


# ---------------------------------------------------------------- engines


def _engine_size_mb(engine: Engine) -> float:
    from ssdopt.backends.engine_dir import engine_files

    return sum(p.stat().st_size for p in engine_files(engine.path, engine.metadata)) / 1e6


def measure_engine(
    engine: Engine, row: dict[str, Any], ctx: BenchContext, cfg: BenchConfig
) -> dict[str, Any]:
    """mAP, detections and latency of a built engine into `row`."""
    result = evaluate_engine(engine, ctx.dataset, batch_size=cfg.eval_batch, progress=False)
    stats = engine_latency(engine, cfg.batch, cfg.plan)
    row.update(
        status=VALIDATED,
        engine=str(engine.path),
        size_mb=_engine_size_mb(engine),
        build_s=engine.metadata.get("build_time_s"),
        map=result.metrics["map"],
        device=engine.metadata.get("device", {}).get("name") or row["device"],
        detections=result.detections,
    )
    _set_latency(row, stats)
    return row


def engine_row(
    backend: str,
    precision: str,
    graph: Path,
    ctx: BenchContext,
    cfg: BenchConfig,
    label: str,
    device: str | None = None,
) -> dict[str, Any]:
    """Build (or reuse) one engine and measure it; any build failure becomes ❌ with its reason."""
    from ssdopt.build import build_engine

    device = device or cfg.device
    row = _row(backend, precision, label, _device_name(device), cfg.batch)
    try:
        runtime = get_backend(backend)
        spec = replace(cfg.spec, device=device, max_batch=max(cfg.spec.max_batch, cfg.batch, cfg.eval_batch))
        device = spec.device if spec.device in runtime.devices else runtime.devices[0]
        runtime.available(device).require(backend, precision)  # type: ignore[call-arg]
        engine = build_engine(
            backend,
            precision,
            graph,
            ctx.engines_dir,
            spec,
            unfolded_onnx=ctx.export_dir / "model_unfolded.onnx",
        )
    except Exception as exc:  # noqa: BLE001 - every build failure is reported, none stops the bench
        row["reason"] = _reason(exc)
        return row
    return measure_engine(engine, row, ctx, cfg)


def extra_engine_row(path: Path, ctx: BenchContext, cfg: BenchConfig) -> dict[str, Any]:
    """A prebuilt engine directory (e.g. from `ssdopt build`), measured like the others."""
    engine = Engine.open(path)
    row = _row(engine.backend, engine.precision, f"engine {path.name}", _device_name(cfg.device), cfg.batch)
    size = engine.metadata.get("input", {}).get("shape", [None, None, None, None])[2]
    if isinstance(size, int) and size != ctx.image_size:
        raise SsdoptError(
            path,
            f"an engine for {ctx.image_size}x{ctx.image_size} inputs like the model, built for {size}x{size}",
            "benchmark engines built from this model's export",
        )
    return measure_engine(engine, row, ctx, cfg)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SsdoptError):
        return f"{exc.expected}; {exc.fix}" if "not importable" not in exc.fix else exc.fix
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


# ---------------------------------------------------------------- where the time goes


def _head_batch(ctx: BenchContext, batch: int) -> np.ndarray:
    from ssdopt.data.images import read_image

    images = [ctx.dataset.images[i % len(ctx.dataset.images)] for i in range(batch)]
    return np.stack([read_image(ctx.dataset.image_path(im), size=ctx.image_size) for im in images])


# ---------------------------------------------------------------- validation and assembly


def validate(rows: list[dict[str, Any]], cfg: BenchConfig) -> None:
    """delta_map and agreement against the ONNX Runtime fp32 row; ✅ -> ❎ outside the budget, and
    ❔ (never ✅) for every built row when there is no reference to validate against."""
    reference = next(
        (
            r
            for r in rows
            if (r["backend"], r["precision"]) == REFERENCE
            and r["status"] != FAILED_BUILD
            and r["graph"].startswith("head")
        ),
        None,
    )
    for row in rows:
        if row["status"] == FAILED_BUILD:
            continue
        if reference is None:
            ref_row = next((r for r in rows if (r["backend"], r["precision"]) == REFERENCE), None)
            why = f": {ref_row['reason']}" if ref_row and ref_row.get("reason") else ""
            row.update(status=NOT_VALIDATED, reason=f"no ONNX Runtime fp32 reference{why}")
            continue
        row["delta_map"] = (
            None
            if row["map"] is None or reference["map"] is None
            else 100.0 * (row["map"] - reference["map"])
        )
        row["agreement"] = agreement(row["detections"], reference["detections"])
        problems = validation_problems(
            row["delta_map"], row["agreement"], cfg.budget_points, cfg.min_agreement
        )
        if problems:
            row.update(status=FAILED_VALIDATION, reason="; ".join(problems))
    for row in rows:
        row["status_name"] = STATUS_NAMES[row["status"]]


def is_peer(row: dict[str, Any]) -> bool:
    """A route a user could take without ssdopt: torch peers, peer routes, ORT fp32 + reference decode."""
    return row["graph"] != "fused SSDDecodeNMS" and not row["graph"].startswith("engine ")


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup = baseline p50 / row p50 (None without a baseline or a latency); vs_best_peer = p50 of
    the fastest validated peer route / row p50 (the peer itself is named in `best_peer`)."""
    base = next((r for r in rows if (r["backend"], r["precision"]) == BASELINE and r["p50_ms"]), None)
    peers = [r for r in rows if is_peer(r) and r["status"] == VALIDATED and r["p50_ms"]]
    best = min(peers, key=lambda r: r["p50_ms"]) if peers else None
    for row in rows:
        if base is not None and row["p50_ms"]:
            row["speedup"] = base["p50_ms"] / row["p50_ms"]
        if best is not None and row["p50_ms"]:
            row["vs_best_peer"] = best["p50_ms"] / row["p50_ms"]
            row["best_peer"] = f"{best['backend']} {best['precision']} ({best['graph']})"


def plan_rows(ctx: BenchContext, cfg: BenchConfig) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(label, thunk) per row, in table order."""
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for peer in COMPILE_PEERS:
        if peer in cfg.peers:
            jobs.append(
                (peer.replace("torch-compile", "torch.compile"), lambda p=peer: compile_row(ctx, cfg, p))
            )
    if "torch-eager" in cfg.peers:
        jobs.append(("torch eager", lambda: eager_row(ctx, cfg)))
    # The accuracy reference of every row: measured whatever `--peers` says (without it no row could be
    # validated, and a ✅ would claim what was never checked).
    model = ctx.export_dir / "model.onnx"
    jobs.append(
        (
            "onnxruntime fp32 (head)",
            lambda: engine_row("onnxruntime", "fp32", model, ctx, cfg, "head+reference-decode", "cpu"),
        )
    )
    from ssdopt.evaluate.peers import PEER_ROUTES

    for name in PEER_ROUTES:
        if name in cfg.peers and cfg.device == "cpu":
            jobs.append((name, lambda n=name: peer_route_row(ctx, cfg, n)))
    for backend in cfg.backends:
        for precision in cfg.precisions:
            jobs.append(
                (
                    f"{backend} {precision}",
                    lambda b=backend, p=precision: engine_row(
                        b, p, ctx.nms_graph, ctx, cfg, "fused SSDDecodeNMS"
                    ),
                )
            )
    for path in cfg.extra_engines:
        jobs.append((f"engine {Path(path).name}", lambda p=Path(path): extra_engine_row(p, ctx, cfg)))
    return jobs


_ORDER = {("torch-eager", "fp32"): 0, **{(peer, "fp32"): 1 for peer in COMPILE_PEERS}}


def run_rows(ctx: BenchContext, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Measure every row (progress bar over rows), validate, add speed-ups; detections are dropped."""
    from tqdm import tqdm

    jobs = plan_rows(ctx, cfg)
    rows = []
    with tqdm(total=len(jobs), desc="bench", unit="row", disable=not cfg.progress) as bar:
        for label, job in jobs:
            bar.set_postfix_str(label)
            rows.append(job())
            bar.update(1)
    rows.sort(key=lambda r: _ORDER.get((r["backend"], r["precision"]), 2))  # stable: keeps engine order
    validate(rows, cfg)
    add_speedups(rows)
    for row in rows:
        row.pop("detections", None)
    return rows


def run_bench(
    checkpoint: Path | str,
    dataset_json: Path | str,
    out_dir: Path | str = Path("reports"),
    work_dir: Path | str = Path("artifacts/bench"),
    cfg: BenchConfig | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark a checkpoint's engines and peers on a COCO split; writes bench.json/.md and
    pareto.png under `out_dir` and returns the rows."""
    from ssdopt.models.zoo import load_checkpoint

    checkpoint, cfg = Path(checkpoint), cfg or BenchConfig()
    ds = subset(load_split(Path(dataset_json)), cfg.limit)
    model, meta = load_checkpoint(checkpoint, class_names=ds.class_names())
    _check_classes(meta["class_names"], ds, str(checkpoint))
    return run_bench_model(model, meta, ds, out_dir, work_dir, cfg, checkpoint=checkpoint, command=command)


def run_bench_model(
    model: Any,
    meta: dict[str, Any],
    ds: CocoDataset,
    out_dir: Path | str,
    work_dir: Path | str,
    cfg: BenchConfig,
    checkpoint: Path | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """run_bench for a model already in memory (tests use tiny torchvision SSDs)."""
    from ssdopt.evaluate.bench_output import write_bench_outputs
    from ssdopt.evaluate.bench_timing import interleave, throughput_sweep, time_split
    from ssdopt.evaluate.report import write_report
    from ssdopt.models.zoo import model_image_size

    if cfg.batch < 1:
        raise SsdoptError("--batch", f"a positive batch size, got {cfg.batch}", "pass e.g. --batch 1")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SsdoptError(
                "--device cuda", "a CUDA device visible to torch", "run on a GPU host, or --device cpu"
            )
    work = Path(work_dir)
    export_dir = export_for_bench(model, meta, checkpoint, work)
    image_size = int(json.loads((export_dir / "export.json").read_text())["image_size"])
    if image_size != model_image_size(model):
        raise SsdoptError(
            export_dir / "export.json",
            f"an export at the model's input size {model_image_size(model)}, found {image_size}",
            f"delete {export_dir} so the bench re-exports",
        )
    ctx = BenchContext(
        model=model.eval(),
        dataset=ds,
        export_dir=export_dir,
        nms_graph=graph_with_decode_nms(export_dir, work),
        engines_dir=work / "engines",
        image_size=image_size,
        checkpoint=checkpoint,
    )
    rows = run_rows(ctx, cfg)
    context = _context_record(meta, ds, cfg, checkpoint, command)
    interleaved = interleave(ctx, cfg, rows)
    if interleaved is not None:
        context["interleaved"] = interleaved
    throughput_sweep(ctx, cfg, rows)
    if cfg.device == "cpu" and cfg.split:
        context["split"] = time_split(ctx, cfg, rows)
    write_bench_outputs(rows, Path(out_dir), context)
    write_report(Path(out_dir))
    return rows


def _context_record(
    meta: dict[str, Any], ds: CocoDataset, cfg: BenchConfig, checkpoint: Path | None, command: str | None
) -> dict[str, Any]:
    import datetime
    import platform

    import torch

    from ssdopt.evaluate.latency import cpu_threads

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_info(),
            **({"gpu": _gpu_record()} if cfg.device == "cuda" else {}),
            "threads": cpu_threads(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": command,
        "model": meta.get("model"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset": str(ds.path),
        "images": len(ds.images),
        "batch": cfg.batch,
        "device": cfg.device,
        "plan": {
            "warmup_s": cfg.plan.warmup_s,
            "min_duration_s": cfg.plan.min_duration_s,
            "min_iterations": cfg.plan.min_iterations,
        },
        "budget_points": cfg.budget_points,
        "min_agreement": cfg.min_agreement,
        "legend": STATUS_NAMES,
    }


def _gpu_record() -> dict[str, Any]:
    import torch

    from ssdopt.backends.device import cuda_info

    return {**(cuda_info() or {}), "torch": torch.__version__, "cuda": torch.version.cuda}


def as_tuple(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """CLI/params lists: a YAML list or a comma-separated string."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = values.split(",")
    return tuple(v.strip() for v in values if v and v.strip())
