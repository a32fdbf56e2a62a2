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
from ssdopt.evaluate.latency import LatencyStats, TimingPlan, time_host


@dataclass(frozen=True)
class EngineResult:
    metrics: dict[str, Any]
    detections: list[dict[str, Any]]


def engine_input_size(engine: Engine) -> tuple[int, int]:
    """(H, W) the engine was built for, from its metadata's input shape."""
    shape = engine.metadata["input"]["shape"]
    return int(shape[2]), int(shape[3])


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
    """pycocotools metrics of an engine on (the first `limit` images of) a split."""
    engine = engine if isinstance(engine, Engine) else Engine.open(engine)
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
) -> float:
    """Share of the reference's confident detections (score >= min_score) that the candidate
    reproduces: same image and category, IoU >= `iou`. 1.0 when the reference has none."""
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
        return 1.0
    matched = 0
    for key, boxes in ref.items():
        other = cand.get(key)
        if other is None:
            continue
        ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(other))
        matched += int((ious.max(dim=1).values >= iou).sum())
    return matched / total


def engine_latency(
    engine: Engine | Path, batch: int = 1, plan: TimingPlan = TimingPlan(), seed: int = 0
) -> LatencyStats:
    """End-to-end latency: a resident pre-processed batch in, detections out (decode included)."""
    engine = engine if isinstance(engine, Engine) else Engine.open(engine)
    runner = get_backend(engine.backend).load(engine.path)
    height, width = engine_input_size(engine)
    images = np.random.default_rng(seed).random((batch, 3, height, width), dtype=np.float32)
    try:
        return time_host(lambda: as_detections(runner.infer(images), engine, height, width), plan, batch)
    finally:
        runner.close()
