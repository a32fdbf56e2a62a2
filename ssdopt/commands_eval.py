"""`ssdopt bench`, `ssdopt evaluate`, `ssdopt detect`: defaults from params.yaml section `bench`."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from ssdopt.backends.registry import PRECISIONS, backend_names, choices
from ssdopt.config import pick, section
from ssdopt.errors import SsdoptError


def build_spec_from_params() -> Any:
    """BuildSpec from params.yaml section `build` (threads, calibration, int8 options)."""
    from ssdopt.backends.base import BuildSpec, CalibrationSpec

    p = section("build")
    cal = p.get("calibration") or {}
    return BuildSpec(
        device=p.get("device", "cpu"),
        max_batch=int(p.get("max_batch", 8)),
        threads=p.get("threads"),
        calibration=CalibrationSpec(
            directory=Path(cal.get("directory", "data/calibration")),
            method=cal.get("method", "minmax"),
            num_images=cal.get("num_images"),
            num_bins=int(cal.get("num_bins", 2048)),
            percentile=float(cal.get("percentile", 99.999)),
        ),
        per_channel=bool(p.get("per_channel", True)),
        int8_exclude=tuple(p.get("int8_exclude") or ()),
        int8_quantizer=p.get("int8_quantizer") or "auto",
        int8_latency_probe=bool(p.get("int8_latency_probe", False)),
        performance_hint=p.get("performance_hint") or "LATENCY",
    )


def _batches(flag: str | None, default: Iterable[int], name: str = "--throughput-batches") -> tuple[int, ...]:
    """`--throughput-batches 1,32,256` (the flag wins over params; '' turns the sweep off)."""
    if flag is None:
        return tuple(int(b) for b in default)
    try:
        batches = tuple(int(b) for b in flag.split(",") if b.strip())
    except ValueError:
        batches = (0,)
    if any(b < 1 for b in batches):
        raise SsdoptError(f"{name} {flag}", "a comma list of positive integers", "e.g. 1,32,256")
    return batches


def bench(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint (params: bench.checkpoint)."),
    dataset: Path | None = typer.Option(None, help="COCO split json (params: bench.dataset)."),
    backends: str | None = typer.Option(
        None, help=f"Comma list of {choices(backend_names())} (params: bench.backends)."
    ),
    precisions: str | None = typer.Option(
        None, help=f"Comma list of {choices(PRECISIONS)} (params: bench.precisions)."
    ),
    peers: str | None = typer.Option(
        None,
        help="torch-eager,torch-compile[-network][-reduce-overhead|-max-autotune],openvino-nncf,"
        "onnxruntime-quantize-static (params: bench.peers, "
        "bench.gpu.peers on cuda); the onnxruntime-fp32 accuracy reference is always measured.",
    ),
    device: str = typer.Option(
        "cpu", help="cpu | cuda: where peers and engines run (cuda: params bench.gpu)."
    ),
    batch: int | None = typer.Option(None, help="Batch for latency (params: bench.batch)."),
    limit: int | None = typer.Option(None, help="Images for mAP; 0 = all (params: bench.limit)."),
    eval_batch: int | None = typer.Option(None, help="Batch for the mAP pass (params: bench.eval_batch)."),
    throughput_batches: str | None = typer.Option(
        None, help="Batch sizes for best images/s; '' = none (params: bench.throughput_batches)."
    ),
    throughput_streams: str | None = typer.Option(
        None,
        help="CPU: requests in flight at each row's best batch, e.g. 1,2; '' = none "
        "(params: bench.throughput_streams).",
    ),
    compile_timeout_s: float | None = typer.Option(
        None, help="Bound on each torch.compile peer, build + first call (params: bench.compile_timeout_s)."
    ),
    engine: list[Path] | None = typer.Option(None, help="Extra prebuilt engine dir (repeatable)."),
    out: Path | None = typer.Option(None, help="Reports dir (params: bench.out)."),
    work: Path | None = typer.Option(None, help="Export/engine cache dir (params: bench.work)."),
    rounds: int | None = typer.Option(None, help="CPU: interleaved timing rounds (params: bench.rounds)."),
    min_iterations: int | None = typer.Option(
        None, help="Timed calls per row and round, at least (params: bench.timing.min_iterations)."
    ),
    min_duration_s: float | None = typer.Option(
        None, help="Seconds per row and round, at least (params: bench.timing.min_duration_s)."
    ),
    quick: bool = typer.Option(False, help="CI size: bench.quick_limit images, short timing plan."),
) -> None:
    """Benchmark engines and peers: table, reports/bench.json, bench.md and pareto.png.

    A slow model on a small CPU (ssd300_vgg16 at ~0.3 s a call) needs fewer timed calls than the
    default 200: --min-iterations 20 --min-duration-s 5."""
    from dataclasses import replace

    from ssdopt.evaluate.bench import BenchConfig, as_tuple, run_bench
    from ssdopt.evaluate.bench_output import print_table
    from ssdopt.evaluate.latency import TimingPlan

    p = section("bench")
    if device == "cuda":  # the GPU's own engine list, peers and compile bound over the CPU defaults
        p = {**p, **(p.get("gpu") or {})}
    timing = p.get("timing") or {}
    plan = (
        TimingPlan.quick()
        if quick
        else TimingPlan(
            warmup_s=float(timing.get("warmup_s", 0.2)),
            min_duration_s=float(pick(min_duration_s, timing, "min_duration_s", 3.0)),
            min_iterations=int(pick(min_iterations, timing, "min_iterations", 200)),
        )
    )
    for flag, value, ok in (
        ("--min-iterations", plan.min_iterations, plan.min_iterations >= 1),
        ("--min-duration-s", plan.min_duration_s, plan.min_duration_s > 0),
        ("--rounds", rounds, rounds is None or rounds >= 1),
    ):
        if not ok:
            raise SsdoptError(f"{flag} {value}", "a positive number", "fix the flag or params.yaml bench")
    default_limit = p.get("quick_limit", 16) if quick else p.get("limit", 200)
    cfg = BenchConfig(
        backends=as_tuple(pick(backends, p, "backends", "onnxruntime,openvino,tensorrt,torch-aoti")),
        precisions=as_tuple(pick(precisions, p, "precisions", "fp32,int8")),
        peers=as_tuple(pick(peers, p, "peers", "torch-eager,torch-compile,onnxruntime-fp32")),
        batch=int(pick(batch, p, "batch", 1)),
        limit=int(limit if limit is not None else default_limit) or None,
        plan=plan,
        budget_points=float(p.get("budget_points", 1.0)),
        min_agreement=float(p.get("min_agreement", 0.9)),
        compile_timeout_s=float(pick(compile_timeout_s, p, "compile_timeout_s", 900)),
        eval_batch=int(pick(eval_batch, p, "eval_batch", 8)),
        rounds=1 if quick else int(pick(rounds, p, "rounds", 1)),
        throughput_batches=_batches(throughput_batches, () if quick else p.get("throughput_batches") or ()),
        throughput_streams=_batches(
            throughput_streams, () if quick else p.get("throughput_streams") or (), "--throughput-streams"
        ),
        spec=replace(build_spec_from_params(), device=device),
        extra_engines=tuple(engine or ()),
        device=device,
    )
    model_checkpoint = section("model").get("checkpoint", "data/reference/ssdlite320_shapes.safetensors")
    rows = run_bench(
        Path(pick(checkpoint, p, "checkpoint", model_checkpoint)),
        Path(pick(dataset, p, "dataset", "data/synthetic/val.json")),
        Path(pick(out, p, "out", "reports")),
        Path(pick(work, p, "work", "artifacts/bench")),
        cfg,
        command="ssdopt " + shlex.join(sys.argv[1:]),
    )
    print_table(rows)


def evaluate(
    engine: Path = typer.Argument(..., help="Engine directory."),
    dataset: Path | None = typer.Option(
        None, help="COCO json or dataset folder, ssdopt or COCO layout (params: bench.dataset)."
    ),
    split: str = typer.Option("val", help="Split, where --dataset is a folder."),
    images: Path | None = typer.Option(None, help="Image folder (default: found beside the json)."),
    reference: Path | None = typer.Option(None, help="fp32 engine dir: ΔmAP and detection agreement."),
    limit: int | None = typer.Option(None, help="First N images (0 = all)."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Also time batch 1 end to end."),
    out: Path | None = typer.Option(None, help="Metrics JSON (default: reports/eval-<engine>.json)."),
) -> None:
    """COCO mAP (pycocotools) of one engine, its batch-1 latency, and ΔmAP/agreement against an fp32
    engine; JSON output (what `ssdopt track log --evaluation` registers, e.g. from a GPU build box)."""
    import datetime

    from ssdopt.backends.device import cpu_info, device_info
    from ssdopt.data.coco import load_split
    from ssdopt.evaluate.bench import subset
    from ssdopt.evaluate.engine import agreement, engine_latency, evaluate_engine, format_agreement
    from ssdopt.evaluate.latency import TimingPlan
    from ssdopt.fileio import write_json

    p = section("bench")
    ds = subset(
        load_split(Path(pick(dataset, p, "dataset", "data/synthetic/val.json")), split, images), limit or None
    )
    result = evaluate_engine(engine, ds)
    from ssdopt.dvcinfo import tracked_md5

    metrics = {
        "engine": str(engine),
        "dataset": str(ds.path),
        "dataset_md5": tracked_md5(ds.path),  # DVC's version of it (`dvc add` the folder), else None
        "images": len(ds.images),
        **result.metrics,
    }
    if reference is not None:
        ref = evaluate_engine(reference, ds)
        metrics["agreement"] = agreement(result.detections, ref.detections)
        metrics["delta_map"] = 100.0 * (result.metrics["map"] - ref.metrics["map"])
        metrics["reference"] = str(reference)
    if latency:
        timing = p.get("timing") or {}
        plan = TimingPlan(
            **{k: timing[k] for k in ("warmup_s", "min_duration_s", "min_iterations") if k in timing}
        )
        stats = engine_latency(engine, batch=1, plan=plan)
        metrics.update(
            p50_ms=stats.median_ms,
            p99_ms=stats.p99_ms,
            mean_ms=stats.mean_ms,
            throughput_ips=stats.throughput_ips,
        )
    kind = json.loads((Path(engine) / "metadata.json").read_text()).get("device", {}).get("kind", "cpu")
    metrics["measured_on"] = {
        "device": device_info(kind) if kind == "cuda" else cpu_info(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path = write_json(metrics, out or Path(p.get("out", "reports")) / f"eval-{Path(engine).name}.json")
    typer.echo(
        f"mAP {metrics['map']:.4f}  mAP50 {metrics['map_50']:.4f}  AR100 {metrics['ar_100']:.4f}"
        + (f"  ΔmAP {metrics['delta_map']:+.2f} pts" if "delta_map" in metrics else "")
        + (f"  agreement {format_agreement(metrics['agreement'])}" if "agreement" in metrics else "")
        + (f"  p50 {metrics['p50_ms']:.2f} ms  p99 {metrics['p99_ms']:.2f} ms" if latency else "")
    )
    typer.echo(f"metrics: {path}")


def detect(
    engine: str = typer.Option(
        ..., help="Engine directory (or models:/NAME@ALIAS where tracking resolves it)."
    ),
    images: list[Path] = typer.Argument(..., help="Image files and folders of images."),
    out: Path = typer.Option(Path("reports/detect"), help="Output directory."),
    min_score: float = typer.Option(0.3, help="Draw and report detections at or above this score."),
    batch_size: int = typer.Option(8, help="Images per engine call."),
) -> None:
    """Detect objects in image files: annotated PNG + JSON per image."""
    from ssdopt.evaluate.detect import detect_images

    for png, record in detect_images(engine, images, out, min_score, batch_size):
        typer.echo(f"{png}  {record}")


def report(
    out: Path | None = typer.Option(None, help="Reports dir holding bench.json (params: bench.out)."),
) -> None:
    """Write reports/index.html: fusion per engine, the latency/mAP table and the Pareto plot."""
    from ssdopt.evaluate.report import write_report

    typer.echo(f"report: {write_report(Path(out or section('bench').get('out', 'reports')))}")


def evaluate_engine_dirs(
    engines: list[Path],
    reference: Path,
    dataset: Path,
    limit: int | None,
    timing: dict[str, Any],
    budget_points: float,
    min_agreement: float,
    out: Path,
) -> dict[str, Path]:
    """Rows like `ssdopt bench` (mAP, ΔmAP and agreement vs `reference`, batch-1 latency) for built
    engine dirs, written under `out`: metrics.json {engine name: metrics}, pareto.json (one point per
    engine: p50_ms, map) and the bench outputs that `ssdopt report` renders. Returns the paths."""
    from ssdopt.backends.base import Engine
    from ssdopt.backends.engine_dir import engine_files
    from ssdopt.data.coco import load_coco
    from ssdopt.errors import SsdoptError
    from ssdopt.evaluate.bench import FAILED_VALIDATION, STATUS_NAMES, VALIDATED
    from ssdopt.evaluate.bench_output import write_bench_outputs
    from ssdopt.evaluate.engine import agreement, engine_latency, evaluate_engine, validation_problems
    from ssdopt.evaluate.latency import TimingPlan
    from ssdopt.fileio import write_json

    if reference not in engines:
        raise SsdoptError(reference, f"one of the evaluated engines {[str(e) for e in engines]}", "pass it")
    ds = load_coco(dataset)
    plan = TimingPlan(**timing)
    rows: list[dict[str, Any]] = []
    for path in engines:
        engine = Engine.open(path)
        meta = engine.metadata
        result = evaluate_engine(engine, ds, limit=limit, progress=False)
        stats = engine_latency(engine, batch=1, plan=plan)
        rows.append(
            {
                "name": path.name,
                "backend": meta["backend"],
                "precision": meta["precision"],
                "graph": "quantized" if meta.get("quantization") or meta.get("fp16") else "export",
                "engine": str(path),
                "status": VALIDATED,
                "size_mb": sum(f.stat().st_size for f in engine_files(path, meta)) / 1e6,
                "build_s": meta.get("build_time_s"),
                "map": result.metrics["map"],
                "map_50": result.metrics["map_50"],
                "detections": result.detections,
                "p50_ms": stats.median_ms,
                "p99_ms": stats.p99_ms,
                "throughput_ips": stats.throughput_ips,
            }
        )
    ref = rows[engines.index(reference)]
    for row in rows:
        row["delta_map"] = 100.0 * (row["map"] - ref["map"])
        row["agreement"] = agreement(row["detections"], ref["detections"])
        row["speedup"] = ref["p50_ms"] / row["p50_ms"]
        problems = validation_problems(row["delta_map"], row["agreement"], budget_points, min_agreement)
        if problems:
            row.update(status=FAILED_VALIDATION, reason="; ".join(problems))
        row["status_name"] = STATUS_NAMES[row["status"]]
    for row in rows:
        del row["detections"]
    keys = ("map", "map_50", "delta_map", "agreement", "p50_ms", "p99_ms", "throughput_ips", "size_mb")
    metrics = {r["name"]: {k: r[k] for k in keys} for r in rows}
    pareto = [
        {"engine": r["name"], "p50_ms": r["p50_ms"], "map": r["map"], "status": r["status_name"]}
        for r in rows
    ]
    import datetime
    import platform

    from ssdopt.backends.device import cpu_info
    from ssdopt.evaluate.latency import cpu_threads

    context = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_info(), "threads": cpu_threads(), "platform": platform.platform()},
        "command": "ssdopt evaluate-engines (DVC stage evaluate)",
        "model": f"engines of {reference}",
        "dataset": str(dataset),
        "images": limit,
        "batch": 1,
        "reference": str(reference),
        "plan": timing if isinstance(timing, dict) else getattr(timing, "__dict__", {}),
        "budget_points": budget_points,
        "min_agreement": min_agreement,
        "legend": STATUS_NAMES,
    }
    return {
        "metrics": write_json(metrics, out / "metrics.json"),
        "pareto_data": write_json(pareto, out / "pareto.json"),
        **write_bench_outputs(rows, out, context),
    }


def evaluate_engines(
    engine: list[Path] = typer.Argument(..., help="Engine directories (e.g. artifacts/engines/*)."),
    reference: Path | None = typer.Option(None, help="fp32 engine for ΔmAP and agreement (default: first)."),
    dataset: Path | None = typer.Option(None, help="COCO split json (default: <generate.out>/<split>.json)."),
    limit: int | None = typer.Option(None, help="First N images (params: optimize.eval_images)."),
    out: Path = typer.Option(Path("reports"), help="Reports dir: metrics.json, pareto.json, bench.json..."),
) -> None:
    """mAP and latency of built engines: reports/metrics.json (DVC metrics), pareto.json (DVC plots),
    and bench.json/bench.md/pareto.png for `ssdopt report` (the DVC `evaluate` stage)."""
    opt = section("optimize")
    timing = opt.get("timing") or {}
    split = opt.get("split", "val")
    paths = evaluate_engine_dirs(
        list(engine),
        reference or engine[0],
        dataset or Path(section("generate").get("out", "data/synthetic")) / f"{split}.json",
        int(limit if limit is not None else opt.get("eval_images", 300)) or None,
        {k: timing[k] for k in ("warmup_s", "min_duration_s", "min_iterations") if k in timing},
        float(opt.get("map_budget", 1.0)),
        float(opt.get("min_agreement", 0.8)),
        out,
    )
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
