"""Engine builds: one task per backend x precision, run in parallel by the flow's task runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from ssdopt.backends.base import BuildSpec, CalibrationSpec
from ssdopt.backends.device import resolve_target
from ssdopt.build import build_engine


@task(name="build-engine", retries=1, retry_delay_seconds=2)
def build(
    backend: str,
    precision: str,
    onnx: str,
    out: str,
    calibration: dict[str, Any],
    threads: int | None = None,
    device: str = "cpu",
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build (or reuse: builds are content-addressed) one engine. Failures become a ❌ row, not a crash.

    The result carries the deployment target read from the engine's own metadata. `options`: BuildSpec
    fields of the engine's entry in optimize.engines (performance_hint, int8_quantizer)."""
    logger = get_run_logger()
    base = {"backend": backend, "precision": precision, "device": device}
    try:
        spec = BuildSpec(
            precision=precision,
            device=device,
            calibration=CalibrationSpec(**calibration),
            threads=threads,
            **(options or {}),
        )
        engine = build_engine(backend, precision, Path(onnx), Path(out), spec)
    except Exception as exc:  # noqa: BLE001 - reported in the table with its reason
        logger.warning("%s %s (%s) failed to build: %s", backend, precision, device, exc)
        return {**base, "status": "failed", "reason": str(exc)[:500]}
    logger.info("%s %s -> %s", backend, precision, engine.path)
    return {
        **base,
        "target": resolve_target(None, engine.metadata.get("device"), device),  # the engine's own
        "status": "built",
        "engine": str(engine.path),
        "engine_sha256": engine.metadata.get("engine", {}).get("sha256"),
        "build_s": engine.metadata.get("build_time_s"),
    }
