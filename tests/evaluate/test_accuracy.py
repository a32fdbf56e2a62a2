"""pycocotools evaluation and dataset prediction, against pycocotools used directly and the model itself."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ssdopt.data.coco import CocoDataset, load_coco, write_coco
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.accuracy import (
    coco_evaluate,
    detections_to_coco,
    evaluate_checkpoint,
    label_to_category,
    predict_dataset,
)
from ssdopt.models.zoo import build_model, save_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "coco_small" / "instances.json"


def _random_dataset(tmp_path: Path, seed: int) -> CocoDataset:
    """60 images 100x80, category ids 3/7/42 (non-contiguous), some images without boxes, one crowd box."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(60):
        images.append({"id": 1000 + i, "file_name": f"{i}.png", "width": 100, "height": 80})
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 60), rng.uniform(0, 40)
            w, h = rng.uniform(4, 40), rng.uniform(4, 40)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 1000 + i,
                    "category_id": int(rng.choice([3, 7, 42])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    annotations[0]["iscrowd"] = 1
    categories = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
    path = write_coco(
        {"images": images, "annotations": annotations, "categories": categories}, tmp_path / "gt.json"
    )
    return load_coco(path)


def _noisy_detections(ds: CocoDataset, seed: int) -> list[dict]:
    """Ground truth jittered, some relabelled, plus false positives, random scores."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in ds.annotations:
        x, y, w, h = a.bbox
        jitter = rng.normal(0, 3, size=4)
        category = a.category_id if rng.random() < 0.8 else int(rng.choice([3, 7, 42]))
        dets.append(
            {
                "image_id": a.image_id,
                "category_id": category,
                "score": float(rng.random()),
                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
            }
        )
    for im in ds.images[::3]:
        dets.append(
            {
                "image_id": im.id,
                "category_id": 7,
                "score": float(rng.random() * 0.5),
                "bbox": [float(rng.uniform(0, 60)), float(rng.uniform(0, 40)), 20.0, 20.0],
            }
        )
    return dets


def _pycocotools_directly(gt_path: Path, dets: list[dict], tmp_path: Path) -> COCOeval:
    det_path = tmp_path / "dets.json"
    det_path.write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(det_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_pycocotools_run_on_the_files(tmp_path: Path, seed: int):
    ds = _random_dataset(tmp_path, seed)
    dets = _noisy_detections(ds, seed)
    got = coco_evaluate(ds, dets)
    reference = _pycocotools_directly(ds.path, dets, tmp_path)
    assert got["map"] == pytest.approx(reference.stats[0]) and got["map_50"] == pytest.approx(
        reference.stats[1]
    )
    assert got["ar_100"] == pytest.approx(reference.stats[8])
    assert 0.05 < got["map"] < 0.95  # neither trivial nor perfect
    one_class = _pycocotools_directly(ds.path, dets, tmp_path)
    one_class.params.catIds = [3]
    with contextlib.redirect_stdout(io.StringIO()):
        one_class.evaluate()
        one_class.accumulate()
        one_class.summarize()
    assert got["per_class"]["c3"] == pytest.approx(one_class.stats[0])
    assert got["num_detections"] == len(dets) and got["num_images"] == 60


def test_perfect_detections_score_one_and_absent_classes_are_none(tmp_path: Path):
    ds = load_coco(FIXTURE)
    dets = [
        {"image_id": a.image_id, "category_id": a.category_id, "bbox": list(a.bbox), "score": 0.9}
        for a in ds.annotations
        if not a.iscrowd
    ]
    got = coco_evaluate(ds, dets)
    assert got["map"] == pytest.approx(1.0) and got["map_50"] == pytest.approx(1.0)
    present = {a.category_id for a in ds.annotations if not a.iscrowd}
    names = {int(c["id"]): c["name"] for c in ds.categories}
    for category_id, name in names.items():
        assert got["per_class"][name] == (pytest.approx(1.0) if category_id in present else None)


def test_no_detections_give_zero(tmp_path: Path):
    ds = _random_dataset(tmp_path, 3)
    got = coco_evaluate(ds, [])
    assert got["map"] == 0.0 and got["ar_100"] == 0.0 and got["num_detections"] == 0
    assert set(got["per_class"]) == {"c3", "c7", "c42"}


def test_detections_of_unknown_image_or_category_are_refused(tmp_path: Path):
    ds = _random_dataset(tmp_path, 4)
    good = {"image_id": 1000, "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.5}
    with pytest.raises(SsdoptError, match="category_id=1"):
        coco_evaluate(ds, [{**good, "category_id": 1}])
    with pytest.raises(SsdoptError, match="image_id=5"):
        coco_evaluate(ds, [{**good, "image_id": 5}])
    with pytest.raises(SsdoptError, match="score"):
        coco_evaluate(ds, [{k: v for k, v in good.items() if k != "score"}])


def test_detections_to_coco_maps_labels_back_and_drops_padding():
    label_map = {1: 42, 2: 3}
    out = detections_to_coco(
        7,
        torch.tensor([[1.0, 2.0, 11.0, 22.0], [0, 0, 1, 1], [0, 0, 2, 2]]),
        torch.tensor([0.9, 0.5, 0.1]),
        torch.tensor([2, -1, 1]),
        label_map,
    )
    assert out == [
        {"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 42, "bbox": [0.0, 0.0, 2.0, 2.0], "score": pytest.approx(0.1)},
    ]


def test_predict_dataset_matches_the_model_on_each_image():
    ds = load_coco(FIXTURE)  # non-contiguous category ids, odd pixel formats, an image without boxes
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=len(ds.class_names())).eval()
    dets = predict_dataset(model, ds, batch_size=2, progress=False)
    inverse = label_to_category(ds)
    assert set(inverse.values()) == {1, 5, 90}
    assert {d["category_id"] for d in dets} <= {1, 5, 90} and dets
    assert {d["image_id"] for d in dets} <= {im.id for im in ds.images}
    image = ds.images[2]
    with torch.no_grad():
        own = model([torch.from_numpy(read_image(ds.image_path(image)))])[0]
    mine = [d for d in dets if d["image_id"] == image.id]
    assert len(mine) == len(own["boxes"])
    expected = detections_to_coco(image.id, own["boxes"], own["scores"], own["labels"], inverse)
    for a, b in zip(
        sorted(mine, key=lambda d: -d["score"]), sorted(expected, key=lambda d: -d["score"]), strict=True
    ):
        assert a["category_id"] == b["category_id"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
    metrics = coco_evaluate(ds, dets)  # random weights: runs end to end, near-zero mAP
    assert 0.0 <= metrics["map"] < 0.2


def test_evaluate_checkpoint_checks_the_classes(tmp_path: Path):
    ds = load_coco(FIXTURE)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=4)
    good = save_checkpoint(
        model,
        tmp_path / "good.safetensors",
        {"model": "ssdlite320_mobilenet_v3_large", "num_classes": 4, "class_names": ds.class_names()},
    )
    metrics = evaluate_checkpoint(good, FIXTURE, batch_size=5, out=tmp_path / "m.json", progress=False)
    assert json.loads((tmp_path / "m.json").read_text())["map"] == metrics["map"]
    renamed = save_checkpoint(
        model,
        tmp_path / "other.safetensors",
        {
            "model": "ssdlite320_mobilenet_v3_large",
            "num_classes": 4,
            "class_names": ["__background__", "x", "y", "z"],
        },
    )
    with pytest.raises(SsdoptError, match="trained on"):
        evaluate_checkpoint(renamed, FIXTURE, progress=False)
    small = build_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    wrong = save_checkpoint(
        small,
        tmp_path / "wrong.safetensors",
        {
            "model": "ssdlite320_mobilenet_v3_large",
            "num_classes": 3,
            "class_names": ["__background__", "x", "y"],
        },
    )
    with pytest.raises(SsdoptError, match="checkpoint has 3 classes"):
        evaluate_checkpoint(wrong, FIXTURE, out=tmp_path / "w.json", progress=False)
    assert not (tmp_path / "w.json").exists()
