"""COCO box mAP by pycocotools, and detections of a torchvision SSD over a dataset in COCO result format.

pycocotools defines mAP for the whole project: every engine's detections go through `coco_evaluate`.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssdopt.data.coco import CocoDataset, coco_dict
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError
from ssdopt.fileio import write_json

# Names of COCOeval.stats, in its order.
STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "ar_1",
    "ar_10",
    "ar_100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def coco_evaluate(gt: CocoDataset, detections: list[dict[str, Any]]) -> dict[str, Any]:
    """pycocotools COCOeval (iouType bbox) of `detections` against `gt`.

    `detections`: COCO result format, one dict per box: image_id, category_id (the dataset's own ids),
    bbox [x, y, w, h] in pixels of the original image, score.
    Returns {map, map_50, map_75, map_small/medium/large, ar_1, ar_10, ar_100, ar_small/medium/large,
    per_class: {class name: AP@[.5:.95] or None when the class has no ground truth}, num_images,
    num_detections}. A metric pycocotools reports as -1 (nothing to measure) is None.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_detections(gt, detections)
    names = {int(c["id"]): str(c["name"]) for c in gt.categories}
    category_ids = sorted(names)
    result: dict[str, Any] = {"num_images": len(gt.images), "num_detections": len(detections)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # pycocotools before 2.0.11 copies "info" in loadRes and fails without it (seen on the GPU host)
        coco_gt.dataset = {"info": {}, **coco_dict(gt)}
        coco_gt.createIndex()
        if not detections:
            # pycocotools cannot load an empty result list; with no detections every AP/AR is 0
            # where there is ground truth to find, and undefined (None) where there is none.
            has_gt = bool(gt.annotations)
            for name in STAT_NAMES:
                result[name] = 0.0 if has_gt else None
            present = {a.category_id for a in gt.annotations if not a.iscrowd}
            result["per_class"] = {names[c]: (0.0 if c in present else None) for c in category_ids}
            return result
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for name, value in zip(STAT_NAMES, evaluator.stats, strict=False):
        result[name] = _defined(value)
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    area_all = list(evaluator.params.areaRngLbl).index("all")
    max_dets_100 = list(evaluator.params.maxDets).index(100)
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, area_all, max_dets_100]
        values = values[values > -1]
        per_class[names[category_id]] = float(values.mean()) if values.size else None
    result["per_class"] = per_class
    return result


def _defined(value: float) -> float | None:
    value = float(value)
    return None if value < 0 or math.isnan(value) else value


def _check_detections(gt: CocoDataset, detections: list[dict[str, Any]]) -> None:
    image_ids = {im.id for im in gt.images}
    category_ids = {int(c["id"]) for c in gt.categories}
    for i, det in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise SsdoptError(
                f"detections[{i}]", f"COCO result fields, missing {missing}", "fix the predictor"
            )
        if det["image_id"] not in image_ids:
            raise SsdoptError(
                f"detections[{i}].image_id={det['image_id']}",
                f"an image id of {gt.path}",
                "predict on the same split you evaluate against",
            )
        if det["category_id"] not in category_ids:
            raise SsdoptError(
                f"detections[{i}].category_id={det['category_id']}",
                f"a category id of {gt.path} ({sorted(category_ids)})",
                "map model labels back to category ids with label_to_category()",
            )


def label_to_category(gt: CocoDataset) -> dict[int, int]:
    """Model label (1..N) -> the dataset's category id; inverse of `CocoDataset.label_map()`."""
    return {label: category_id for category_id, label in gt.label_map().items()}


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    label_map: dict[int, int],
) -> list[dict[str, Any]]:
    """One image's detections (boxes [K, 4] x1,y1,x2,y2 in original pixels, scores [K], labels [K]) in
    COCO result format. Labels absent from `label_map` (background, padding -1) are dropped."""
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    scores = np.asarray(
        scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64
    )
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    out = []
    rows = zip(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1), strict=True)
    for (x1, y1, x2, y2), score, label in rows:
        category = label_map.get(int(label))
        if category is None:
            continue
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            }
        )
    return out


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prefetched(ds: CocoDataset, batches: Iterable[list], workers: int = 4) -> Iterator[tuple[list, list]]:
    """(images, decoded [3, H, W] float32 arrays) per batch, decoding the next batch in threads meanwhile."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(lambda b: (b, list(map(lambda im: read_image(ds.image_path(im)), b))), batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


@torch.inference_mode()
def predict_dataset(
    model: torch.nn.Module,
    ds: CocoDataset,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run a torchvision detector (its own transform and post-processing) over every image of `ds`.

    Images are read with `ssdopt.data.images.read_image` (float32 RGB in [0, 1], original size);
    the model resizes and normalises them itself and returns boxes in original pixels.
    Returns COCO result dicts with category ids mapped back from model labels.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise SsdoptError("batch_size", f"a positive integer, got {batch_size}", "pass e.g. --batch-size 16")
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    label_map = label_to_category(ds)
    detections: list[dict[str, Any]] = []
    bar = tqdm(total=len(ds.images), desc="predicting", unit="img", disable=not progress)
    try:
        for images, arrays in _prefetched(ds, _batches(ds.images, batch_size)):
            tensors = [torch.from_numpy(a).to(device) for a in arrays]
            outputs = model(tensors)
            for image, out in zip(images, outputs, strict=True):
                detections += detections_to_coco(
                    image.id, out["boxes"], out["scores"], out["labels"], label_map
                )
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    return detections


def evaluate_checkpoint(
    checkpoint: Path,
    coco_json: Path,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    out: Path | None = None,
    progress: bool = True,
    image_dir: Path | None = None,
) -> dict[str, Any]:
    """pycocotools metrics of a checkpoint on a COCO split, with the model's own post-processing.

    The checkpoint's class names must equal the dataset's. With `out`, the metrics (plus the checkpoint
    and dataset paths) are written there as JSON, atomically.
    """
    from ssdopt.data.coco import load_split
    from ssdopt.models.zoo import load_checkpoint

    ds = load_split(coco_json, images=image_dir)
    names = ds.class_names()
    # a user's own state dict records no names: it is taken to be of this dataset's classes (the count
    # is still checked); label 0 is background whatever a checkpoint calls it
    model, meta = load_checkpoint(checkpoint, expected_num_classes=len(names), class_names=names)
    if list(meta["class_names"])[1:] != names[1:]:
        raise SsdoptError(
            checkpoint,
            f"a model of the classes of {coco_json} ({names[1:]}), "
            f"but it was trained on {meta['class_names'][1:]}",
            "evaluate on the dataset the checkpoint was trained for",
        )
    metrics = coco_evaluate(
        ds, predict_dataset(model, ds, batch_size=batch_size, device=device, progress=progress)
    )
    metrics = {"checkpoint": str(checkpoint), "dataset": str(coco_json), **metrics}
    if out is not None:
        write_json(metrics, Path(out))
    return metrics
