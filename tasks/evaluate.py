"""Accuracy and latency of each engine; cached on the engine's content so a rerun costs nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from ssdopt.data.coco import load_coco
from ssdopt.evaluate.engine import agreement, engine_latency, evaluate_engine
from ssdopt.evaluate.latency import TimingPlan


@task(name="evaluate-engine", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def evaluate(
    engine: str,
    engine_sha256: str,
    dataset_json: str,
    dataset_md5: str | None,
    limit: int,
    timing: dict[str, Any],
    image_dir: str | None = None,
) -> dict[str, Any]:
    """mAP (pycocotools) on the first `limit` images and batch-1 end-to-end latency.

    `engine_sha256` and `dataset_md5` are inputs only so that the cache key follows content.
    """
    logger = get_run_logger()
    ds = load_coco(Path(dataset_json), Path(image_dir) if image_dir else None)
    # one bar per engine for a person at a terminal; none in logs and CI
    result = evaluate_engine(Path(engine), ds, limit=limit, progress=sys.stderr.isatty())
    stats = engine_latency(Path(engine), batch=1, plan=TimingPlan(**timing))
    logger.info(
        "%s: mAP %.4f, p50 %.2f ms, p99 %.2f ms",
        Path(engine).name,
        result.metrics["map"],
        stats.median_ms,
        stats.p99_ms,
    )
    return {
        "map": result.metrics["map"],
        "map_50": result.metrics["map_50"],
        "detections": result.detections,
        "latency": stats.as_dict(),
    }


@task(name="agreement")
def agreement_with(reference: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> float:
    """Share of the fp32 reference engine's confident detections the candidate reproduces."""
    return agreement(candidate, reference)
