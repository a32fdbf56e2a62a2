"""`ssdopt build`: one engine per call; defaults from params.yaml section `build`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssdopt.config import section


def _pick(value: Any, params: dict[str, Any], key: str, default: Any) -> Any:
    """CLI value if given, else params.yaml, else the built-in default."""
    if value is not None:
        return value
    return params.get(key, default)


def build(
    backend: str | None = typer.Option(
        None, help="onnxruntime | openvino | tensorrt (params: build.backend)."
    ),
    precision: str | None = typer.Option(None, help="fp32 | fp16 | bf16 | int8 (params: build.precision)."),
    onnx: Path | None = typer.Option(None, help="Exported ONNX (params: build.onnx)."),
    out: Path | None = typer.Option(
        None, help="Engines root; the engine goes to OUT/<backend>-<precision>-<key>."
    ),
    device: str | None = typer.Option(None, help="cpu | cuda (params: build.device)."),
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
) -> None:
    """Build (or reuse) an inference engine; prints its directory and fusion summary."""
    from ssdopt.backends.base import BuildSpec, CalibrationSpec
    from ssdopt.build import build_engine

    p = section("build")
    cal = p.get("calibration") or {}
    calibration_spec = CalibrationSpec(
        directory=Path(_pick(calibration, cal, "directory", "data/calibration")),
        method=_pick(method, cal, "method", "minmax"),
        num_images=cal.get("num_images"),
        num_bins=int(cal.get("num_bins", 2048)),
        percentile=float(cal.get("percentile", 99.999)),
    )
    timing_cache = p.get("timing_cache")
    plugin = p.get("plugin_library")
    spec = BuildSpec(
        device=_pick(device, p, "device", "cpu"),
        max_batch=int(_pick(max_batch, p, "max_batch", 8)),
        threads=_pick(threads, p, "threads", None),
        calibration=calibration_spec,
        per_channel=bool(p.get("per_channel", True)),
        int8_exclude=tuple(exclude or p.get("int8_exclude") or ()),
        workspace_mib=int(p.get("workspace_mib", 2048)),
        timing_cache=Path(timing_cache) if timing_cache else None,
        plugin_library=Path(plugin) if plugin else None,
        hardware_compatible=bool(p.get("hardware_compatible", False)),
        version_compatible=bool(p.get("version_compatible", False)),
    )
    engine = build_engine(
        _pick(backend, p, "backend", "onnxruntime"),
        _pick(precision, p, "precision", "fp32"),
        Path(_pick(onnx, p, "onnx", "artifacts/onnx/model.onnx")),
        Path(_pick(out, p, "out", "artifacts/engines")),
        spec,
    )
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
