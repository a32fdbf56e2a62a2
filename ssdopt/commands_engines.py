"""`ssdopt build`: one engine per call; defaults from params.yaml section `build`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import typer

from ssdopt.backends.registry import DEVICES, PRECISIONS, backend_names, choices
from ssdopt.config import pick, section


def build(
    backend: str | None = typer.Option(None, help=f"{choices(backend_names())} (params: build.backend)."),
    precision: str | None = typer.Option(None, help=f"{choices(PRECISIONS)} (params: build.precision)."),
    onnx: Path | None = typer.Option(None, help="Exported ONNX (params: build.onnx)."),
    out: Path | None = typer.Option(
        None, help="Engines root; the engine goes to OUT/<backend>-<precision>-<key>."
    ),
    device: str | None = typer.Option(None, help=f"{choices(DEVICES)} (params: build.device)."),
    calibration: Path | None = typer.Option(
        None, help="Calibration set dir (params: build.calibration.directory)."
    ),
    method: str | None = typer.Option(
        None, help="minmax | entropy | percentile (params: build.calibration.method)."
    ),
    max_batch: int | None = typer.Option(
        None, help="Largest batch (TensorRT profile; params: build.max_batch)."
    ),
    threads: int | None = typer.Option(
        None, help="Intra-op threads (params: build.threads; none = runtime default)."
    ),
    exclude: list[str] | None = typer.Option(None, help="Node kept in float in int8 (repeatable)."),
    exact_out: Path | None = typer.Option(
        None, "--exact-out", help="Write the engine to exactly this directory (a stable path for DVC)."
    ),
) -> None:
    """Build (or reuse) an inference engine; prints its directory and fusion summary."""
    from ssdopt.backends.base import BuildSpec, CalibrationSpec
    from ssdopt.build import build_engine

    p = section("build")
    cal = p.get("calibration") or {}
    calibration_spec = CalibrationSpec(
        directory=Path(pick(calibration, cal, "directory", "data/calibration")),
        method=pick(method, cal, "method", "minmax"),
        num_images=cal.get("num_images"),
        num_bins=int(cal.get("num_bins", 2048)),
        percentile=float(cal.get("percentile", 99.999)),
    )
    timing_cache = p.get("timing_cache")
    plugin = p.get("plugin_library")
    spec = BuildSpec(
        device=pick(device, p, "device", "cpu"),
        max_batch=int(pick(max_batch, p, "max_batch", 8)),
        threads=pick(threads, p, "threads", None),
        calibration=calibration_spec,
        per_channel=bool(p.get("per_channel", True)),
        int8_exclude=tuple(exclude or p.get("int8_exclude") or ()),
        workspace_mib=int(p.get("workspace_mib", 2048)),
        timing_cache=Path(timing_cache) if timing_cache else None,
        plugin_library=Path(plugin) if plugin else None,
        hardware_compatible=bool(p.get("hardware_compatible", False)),
        version_compatible=bool(p.get("version_compatible", False)),
        int8_quantizer=p.get("int8_quantizer") or "auto",
        int8_latency_probe=bool(p.get("int8_latency_probe", False)),
        performance_hint=p.get("performance_hint") or "LATENCY",
    )
    args = (
        pick(backend, p, "backend", "onnxruntime"),
        pick(precision, p, "precision", "fp32"),
        Path(pick(onnx, p, "onnx", "artifacts/onnx/model.onnx")),
    )
    if exact_out is None:
        engine = build_engine(*args, Path(pick(out, p, "out", "artifacts/engines")), spec)
    else:
        engine = build_engine_at(*args, exact_out, spec)
    meta = engine.metadata
    fusion = (
        (engine.path / "fusion.md").read_text().splitlines() if (engine.path / "fusion.md").is_file() else []
    )
    summary = next((line for line in fusion if line.startswith("Conv->BN")), "")
    typer.echo(f"engine: {engine.path}")
    typer.echo(
        f"  {meta['backend']} {meta['runtime']['version']} {meta['precision']} "
        f"on {meta['device'].get('name')}; "
        f"built in {meta['build_time_s']} s; sha256 {meta['engine']['sha256'][:16]}"
    )
    if summary:
        typer.echo(f"  {summary}")


def replace_dir(built: Path, dest: Path) -> Path:
    """Move directory `built` to `dest` (same filesystem), replacing what was there; returns `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
    os.replace(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def build_engine_at(backend: str, precision: str, onnx: Path, dest: Path, spec: Any) -> Any:
    """build_engine into a temp dir beside `dest`, then moved to exactly `dest` (DVC tracks that path)."""
    from ssdopt.backends.base import Engine
    from ssdopt.build import build_engine
    from ssdopt.fileio import created_dirs

    with (
        created_dirs(dest.parent),
        tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.build-") as work,
    ):
        engine = build_engine(backend, precision, onnx, Path(work), spec)
        replace_dir(engine.path, dest)
    return Engine.open(dest)


QUANTIZE_SIDECARS = ("anchors.npy", "export.json", "model_unfolded.onnx")


def quantize_graph(
    precision: str, onnx: Path, dest: Path, calibration: Any = None, target: str = "onnxruntime"
) -> Path:
    """`dest`/model.onnx: the fp16 or Q/DQ int8 graph of `onnx`, beside copies of the export's sidecars
    (anchors.npy, export.json, model_unfolded.onnx) and quantize.json (how it was made). Atomic."""
    import json

    from ssdopt.errors import SsdoptError

    if precision not in ("fp16", "int8"):
        raise SsdoptError(f"--precision {precision}", "fp16 or int8", "fp32 needs no quantize step")
    if not onnx.is_file():
        raise SsdoptError(onnx, "an exported ONNX file", "run `dvc repro export` (or `ssdopt export`)")
    from ssdopt.backends.graph import load_topology
    from ssdopt.fileio import created_dirs

    load_topology(onnx)  # limits, opset and external data checked before anything is written
    with (
        created_dirs(dest.parent),
        tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.work-") as tmp,
    ):
        work = Path(tmp) / dest.name
        work.mkdir()
        if precision == "fp16":
            from ssdopt.quantize.fp16 import convert_file_to_fp16

            record = {"fp16": convert_file_to_fp16(onnx, work / "model.onnx")}
        else:
            from ssdopt.backends.graph import input_spec
            from ssdopt.quantize.calibration_reader import calibration_reader, calibration_version
            from ssdopt.quantize.int8 import quantize_int8

            image = input_spec(load_topology(onnx))
            reader = calibration_reader(
                calibration.directory, image["shape"][2], image["name"], calibration.num_images
            )
            quant = quantize_int8(
                onnx, work / "model.onnx", target=target, reader=reader, calibration=calibration
            )
            version = calibration_version(calibration.directory, calibration.num_images)
            record = {"quantization": quant, "calibration": {**version, "method": calibration.method}}
        for name in QUANTIZE_SIDECARS:
            if (onnx.parent / name).is_file():
                shutil.copyfile(onnx.parent / name, work / name)
        record = {"precision": precision, "source_onnx": str(onnx), "target": target, **record}
        (work / "quantize.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        replace_dir(work, dest)
    return dest


def quantize(
    precision: str = typer.Option(..., help="fp16 | int8"),
    onnx: Path | None = typer.Option(None, help="Float export (params: build.onnx)."),
    out: Path | None = typer.Option(
        None, help="Output directory (default: artifacts/quantized/<precision>)."
    ),
    method: str | None = typer.Option(
        None, help="minmax | entropy | percentile (params: quantize.calibration_method)."
    ),
    calibration: Path | None = typer.Option(
        None, help="Calibration set dir (params: build.calibration.directory)."
    ),
    target: str = typer.Option("onnxruntime", help="Runtime the Q/DQ types suit (int8)."),
) -> None:
    """Write the fp16 or int8 (Q/DQ) graph of the export: OUT/model.onnx + sidecars (DVC stage quantize)."""
    from ssdopt.quantize.calibration_reader import CalibrationSpec

    p, q = section("build"), section("quantize")
    cal = p.get("calibration") or {}
    spec = CalibrationSpec(
        directory=Path(pick(calibration, cal, "directory", "data/calibration")),
        method=method or q.get("calibration_method") or cal.get("method", "minmax"),
        num_images=q.get("num_images", cal.get("num_images")),
        num_bins=int(q.get("num_bins", cal.get("num_bins", 2048))),
        percentile=float(q.get("percentile", cal.get("percentile", 99.999))),
    )
    path = quantize_graph(
        precision,
        Path(pick(onnx, p, "onnx", "artifacts/onnx/model.onnx")),
        out or Path("artifacts/quantized") / precision,
        spec,
        target,
    )
    typer.echo(f"{precision} graph: {path / 'model.onnx'}")
