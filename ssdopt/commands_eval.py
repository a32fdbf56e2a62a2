"""`ssdopt bench`, `ssdopt evaluate`, `ssdopt detect`: defaults from params.yaml section `bench`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from ssdopt.config import section


def _pick(value: Any, params: dict[str, Any], key: str, default: Any) -> Any:
    """CLI value if given, else params.yaml, else the built-in default."""
    if value is not None:
        return value
    return params.get(key, default)


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
    )


def bench(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint (params: bench.checkpoint)."),
    dataset: Path | None = typer.Option(None, help="COCO split json (params: bench.dataset)."),
    backends: str | None = typer.Option(None, help="Comma list (params: bench.backends)."),
    precisions: str | None = typer.Option(None, help="Comma list (params: bench.precisions)."),
    peers: str | None = typer.Option(
        None, help="torch-eager,torch-compile,onnxruntime-fp32 (params: bench.peers)."
    ),
    batch: int | None = typer.Option(None, help="Batch for latency (params: bench.batch)."),
    limit: int | None = typer.Option(None, help="Images for mAP; 0 = all (params: bench.limit)."),
    engine: list[Path] | None = typer.Option(None, help="Extra prebuilt engine dir (repeatable)."),
    out: Path | None = typer.Option(None, help="Reports dir (params: bench.out)."),
    work: Path | None = typer.Option(None, help="Export/engine cache dir (params: bench.work)."),
    quick: bool = typer.Option(False, help="CI size: bench.quick_limit images, short timing plan."),
) -> None:
    """Benchmark engines and peers: table, reports/bench.json, bench.md and pareto.png."""
    from ssdopt.evaluate.bench import BenchConfig, as_tuple, run_bench
    from ssdopt.evaluate.bench_output import print_table
    from ssdopt.evaluate.latency import TimingPlan

    p = section("bench")
    timing = p.get("timing") or {}
    plan = (
        TimingPlan.quick()
        if quick
        else TimingPlan(
            warmup_s=float(timing.get("warmup_s", 0.2)),
            min_duration_s=float(timing.get("min_duration_s", 3.0)),
            min_iterations=int(timing.get("min_iterations", 200)),
        )
    )
    default_limit = p.get("quick_limit", 16) if quick else p.get("limit", 200)
    cfg = BenchConfig(
        backends=as_tuple(_pick(backends, p, "backends", "onnxruntime,openvino,tensorrt,torch-aoti")),
        precisions=as_tuple(_pick(precisions, p, "precisions", "fp32,int8")),
        peers=as_tuple(_pick(peers, p, "peers", "torch-eager,torch-compile,onnxruntime-fp32")),
        batch=int(_pick(batch, p, "batch", 1)),
        limit=int(limit if limit is not None else default_limit) or None,
        plan=plan,
        budget_points=float(p.get("budget_points", 1.0)),
        min_agreement=float(p.get("min_agreement", 0.9)),
        compile_timeout_s=float(p.get("compile_timeout_s", 900)),
        eval_batch=int(p.get("eval_batch", 8)),
        spec=build_spec_from_params(),
        extra_engines=tuple(engine or ()),
    )
    model_checkpoint = section("model").get("checkpoint", "data/reference/ssdlite320_shapes.safetensors")
    rows = run_bench(
        Path(_pick(checkpoint, p, "checkpoint", model_checkpoint)),
        Path(_pick(dataset, p, "dataset", "data/synthetic/val.json")),
        Path(_pick(out, p, "out", "reports")),
        Path(_pick(work, p, "work", "artifacts/bench")),
        cfg,
        command="ssdopt " + shlex.join(sys.argv[1:]),
    )
    print_table(rows)


def evaluate(
    engine: Path = typer.Argument(..., help="Engine directory."),
    dataset: Path | None = typer.Option(None, help="COCO split json (params: bench.dataset)."),
    reference: Path | None = typer.Option(None, help="fp32 engine dir for detection agreement."),
    limit: int | None = typer.Option(None, help="First N images (0 = all)."),
    out: Path | None = typer.Option(None, help="Metrics JSON (default: reports/eval-<engine>.json)."),
) -> None:
    """COCO mAP (pycocotools) of one engine, plus agreement with an fp32 engine; JSON output."""
    from ssdopt.data.coco import load_coco
    from ssdopt.evaluate.accuracy import write_json
    from ssdopt.evaluate.bench import subset
    from ssdopt.evaluate.engine import agreement, evaluate_engine

    p = section("bench")
    ds = subset(load_coco(Path(_pick(dataset, p, "dataset", "data/synthetic/val.json"))), limit or None)
    result = evaluate_engine(engine, ds)
    metrics = {"engine": str(engine), "dataset": str(ds.path), **result.metrics}
    if reference is not None:
        metrics["agreement"] = agreement(result.detections, evaluate_engine(reference, ds).detections)
        metrics["reference"] = str(reference)
    path = write_json(metrics, out or Path(p.get("out", "reports")) / f"eval-{Path(engine).name}.json")
    typer.echo(
        f"mAP {metrics['map']:.4f}  mAP50 {metrics['map_50']:.4f}  AR100 {metrics['ar_100']:.4f}"
        + (f"  agreement {metrics['agreement']:.3f}" if "agreement" in metrics else "")
    )
    typer.echo(f"metrics: {path}")


def detect(
    engine: str = typer.Option(
        ..., help="Engine directory (or models:/NAME@ALIAS where tracking resolves it)."
    ),
    images: list[Path] = typer.Argument(..., help="Image files."),
    out: Path = typer.Option(Path("reports/detect"), help="Output directory."),
    min_score: float = typer.Option(0.3, help="Draw and report detections at or above this score."),
) -> None:
    """Detect objects in image files: annotated PNG + JSON per image."""
    from ssdopt.evaluate.detect import detect_images

    for png, record in detect_images(engine, images, out, min_score):
        typer.echo(f"{png}  {record}")


def report(
    out: Path | None = typer.Option(None, help="Reports dir holding bench.json (params: bench.out)."),
) -> None:
    """Write reports/index.html: fusion per engine, the latency/mAP table and the Pareto plot."""
    from ssdopt.evaluate.report import write_report

    typer.echo(f"report: {write_report(Path(out or section('bench').get('out', 'reports')))}")
