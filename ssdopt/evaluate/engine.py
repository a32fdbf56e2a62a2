"""Accuracy and latency of a built engine, the numbers every row of the benchmark table holds.

Accuracy: the engine's fixed-size detections over a COCO split, scored by pycocotools, plus the
share of the fp32 engine's detections it reproduces. Latency: end to end (pre-processed batch
in, detections out) with the trtexec-style plan of latency.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.backends.base import Detections, Engine, HeadOutputs, get_backend
from ssdopt.data.coco import CocoDataset, CocoImage
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.accuracy import coco_evaluate, detections_to_coco, label_to_category
from ssdopt.evaluate.latency import LatencyStats, TimingPlan, time_cuda, time_host


@dataclass(frozen=True)
class EngineResult:
    metrics: dict[str, Any]
    detections: list[dict[str, Any]]


def engine_input_size(engine: Engine) -> tuple[int, int]:
    """(H, W) the engine was built for, from its metadata's input shape."""
    shape = engine.metadata["input"]["shape"]
    return int(shape[2]), int(shape[3])


def engine_classes(engine: Engine) -> tuple[list[str] | None, int | None]:
    """(class names by label, 0 = background; class count with background) that the engine's export
    recorded in export.json (copied beside every engine); None where it recorded none."""
    import json

    record = engine.path / "export.json"
    info = json.loads(record.read_text()) if record.is_file() else {}
    names = [str(n) for n in info["class_names"]] if info.get("class_names") else None
    count = int(info["num_classes"]) if info.get("num_classes") else (len(names) if names else None)
    return names, count


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def check_classes(engine: Engine, ds: CocoDataset) -> None:
    """Refuse to score an engine on a dataset of other classes: pycocotools would print a small,
    plausible mAP for labels that mean something else. The background entry's name is not compared
    (exports call it "__background__", "background", "bg", ...)."""
    names, count = engine_classes(engine)
    wanted = ds.class_names()
    fix = (
        f"evaluate on the dataset the model was trained for, or export a checkpoint trained on the "
        f"classes of {ds.path} and build its engines again"
    )
    if names is not None and names[1:] != wanted[1:]:
        raise SsdoptError(
            engine.path,
            f"an engine of the {len(wanted) - 1} classes of {ds.path} ({_shown(wanted[1:])}); "
            f"its export has {len(names) - 1} ({_shown(names[1:])})",
            fix,
        )
    if names is None and count is not None and count != len(wanted):
        raise SsdoptError(
            engine.path,
            f"an engine of {len(wanted) - 1} classes + background for {ds.path}; its export has "
            f"{count - 1} + background",
            fix,
        )


def _batches(images: list[CocoImage], size: int) -> Iterator[list[CocoImage]]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def as_detections(result: Detections | HeadOutputs, engine: Engine, height: int, width: int) -> Detections:
    """Engines whose graph has no SSDDecodeNMS node return head outputs: decode with the reference."""
    if isinstance(result, Detections):
        return result
    anchors = engine.anchors()
    if anchors is None:
        raise SsdoptError(
            engine.path / "anchors.npy",
            "the export's anchors beside an engine without SSDDecodeNMS (to decode its head outputs)",
            "rebuild the engine from the export directory with `ssdopt build` (it copies anchors.npy)",
        )
    return result.decode(anchors, image_height=height, image_width=width)


def predict_engine(
    engine: Engine, ds: CocoDataset, limit: int | None = None, batch_size: int = 8, progress: bool = True
) -> list[dict[str, Any]]:
    """COCO result dicts of `engine` over the first `limit` images of `ds` (boxes in original pixels)."""
    from tqdm import tqdm

    runner = get_backend(engine.backend).load(engine.path)
    height, width = engine_input_size(engine)
    label_map = label_to_category(ds)
    images = ds.images[:limit] if limit else ds.images
    out: list[dict[str, Any]] = []
    try:
        with tqdm(
            total=len(images), desc=f"eval {engine.path.name}", unit="img", disable=not progress
        ) as bar:
            for chunk in _batches(images, batch_size):
                batch = np.stack([read_image(ds.image_path(im), size=height) for im in chunk])
                dets = as_detections(runner.infer(batch), engine, height, width)
                for i, im in enumerate(chunk):
                    n = int(dets.num_detections[i])
                    scale = np.array([im.width / width, im.height / height] * 2, dtype=np.float32)
                    out += detections_to_coco(
                        im.id, dets.boxes[i, :n] * scale, dets.scores[i, :n], dets.labels[i, :n], label_map
                    )
                bar.update(len(chunk))
    finally:
        runner.close()
    return out


def evaluate_engine(
    engine: Engine | Path,
    ds: CocoDataset,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EngineResult:
    """pycocotools metrics of an engine on (the first `limit` images of) a split of its classes."""
    engine = engine if isinstance(engine, Engine) else Engine.open(engine)
    check_classes(engine, ds)
    subset = ds
    if limit:
        keep = {im.id for im in ds.images[:limit]}
        subset = CocoDataset(
            path=ds.path,
            image_dir=ds.image_dir,
            images=ds.images[:limit],
            annotations=[a for a in ds.annotations if a.image_id in keep],
            categories=ds.categories,
        )
    detections = predict_engine(engine, subset, batch_size=batch_size, progress=progress)
    return EngineResult(coco_evaluate(subset, detections), detections)


def agreement(
    candidate: list[dict[str, Any]], reference: list[dict[str, Any]], iou: float = 0.5, min_score: float = 0.3
) -> float | None:
    """Share of the reference's confident detections (score >= min_score) that the candidate
    reproduces: same image and category, IoU >= `iou`. None (shown as n/a) when the reference has
    no confident detection: there is nothing to agree with, which is not agreement."""
    import torch
    from torchvision.ops import box_iou

    def index(dets: list[dict[str, Any]]) -> dict[tuple[int, int], np.ndarray]:
        groups: dict[tuple[int, int], list[list[float]]] = {}
        for d in dets:
            if d["score"] >= min_score:
                x, y, w, h = d["bbox"]
                groups.setdefault((d["image_id"], d["category_id"]), []).append([x, y, x + w, y + h])
        return {k: np.asarray(v, dtype=np.float32) for k, v in groups.items()}

    ref, cand = index(reference), index(candidate)
    total = sum(len(v) for v in ref.values())
    if total == 0:
        return None
    matched = 0
    for key, boxes in ref.items():
        other = cand.get(key)
        if other is None:
            continue
        ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(other))
        matched += int((ious.max(dim=1).values >= iou).sum())
    return matched / total


def format_agreement(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def validation_problems(
    delta_map: float | None, agreement_share: float | None, budget_points: float, min_agreement: float
) -> list[str]:
    """Why an engine fails the accuracy gate against its fp32 reference ([] = it passes). The one gate
    of `ssdopt bench`, `ssdopt evaluate-engines` and the optimize flow. An undefined agreement (the
    reference found nothing confident) is no failure: ΔmAP alone decides."""
    problems = []
    if delta_map is not None and delta_map < -budget_points:
        problems.append(f"mAP {delta_map:+.2f} points (budget -{budget_points:g})")
    if agreement_share is not None and agreement_share < min_agreement:
        problems.append(f"agreement {agreement_share:.3f} < {min_agreement:g}")
    return problems


def engine_latency(
    engine: Engine | Path, batch: int = 1, plan: TimingPlan = TimingPlan(), seed: int = 0
) -> LatencyStats:
    """End-to-end latency: a resident pre-processed batch in, detections out (decode included)."""
    engine = engine if isinstance(engine, Engine) else Engine.open(engine)
    runner = get_backend(engine.backend).load(engine.path)
    height, width = engine_input_size(engine)
    images = np.random.default_rng(seed).random((batch, 3, height, width), dtype=np.float32)
    try:
        if getattr(runner, "device", "cpu") == "cuda" and hasattr(runner, "forward"):
            return _resident_cuda_latency(runner, images, plan, batch)
        return time_host(lambda: as_detections(runner.infer(images), engine, height, width), plan, batch)
    finally:
        runner.close()


def engine_throughput(
    engine: Engine | Path, batches: tuple[int, ...], plan: TimingPlan = TimingPlan(), seed: int = 0
) -> dict[int, LatencyStats | str]:
    """End-to-end timing at each batch size with one loaded runner (a GPU engine compiles and captures
    a CUDA graph per batch size once, not once per load): stats per batch, or why that batch failed."""
    engine = engine if isinstance(engine, Engine) else Engine.open(engine)
    runner = get_backend(engine.backend).load(engine.path)
    height, width = engine_input_size(engine)
    by_batch: dict[int, LatencyStats | str] = {}
    try:
        for batch in batches:
            images = np.random.default_rng(seed).random((batch, 3, height, width), dtype=np.float32)
            try:
                if getattr(runner, "device", "cpu") == "cuda" and hasattr(runner, "forward"):
                    by_batch[batch] = _resident_cuda_latency(runner, images, plan, batch)
                else:

                    def call(batch_images: np.ndarray = images) -> Any:
                        return as_detections(runner.infer(batch_images), engine, height, width)

                    by_batch[batch] = time_host(call, plan, batch)
            except Exception as exc:  # noqa: BLE001 - e.g. a batch above the engine's max_batch
                by_batch[batch] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        runner.close()
    return by_batch


def _resident_cuda_latency(runner: Any, images: np.ndarray, plan: TimingPlan, batch: int) -> LatencyStats:
    """A GPU engine's end to end: the pre-processed batch already on the GPU, the fixed-size detections
    left there (what a GPU pipeline feeds and consumes), timed with CUDA events around each call."""
    import torch

    resident = torch.from_numpy(images).to("cuda")
    stats = time_cuda(lambda: runner.forward(resident), plan, batch)
    return LatencyStats(**{**stats.as_dict(), "extra": {**stats.extra, "input": "resident on the GPU"}})
