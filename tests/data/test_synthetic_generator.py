"""The synthetic generator: deterministic bytes, valid COCO boxes, the occlusion rule, atomic output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssdopt.data import synthetic
from ssdopt.data.synthetic import CLASSES, generate_dataset, generate_image, image_rng
from ssdopt.errors import SsdoptError


def _spec(dataset: Path) -> tuple[int, dict[str, int]]:
    """(seed, splits) the session's tiny dataset was made with, read from its dataset.json."""
    summary = json.loads((dataset / "dataset.json").read_text())
    return summary["seed"], {split: info["images"] for split, info in summary["splits"].items()}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tiny_dataset: Path, tmp_path: Path) -> None:
    seed, splits = _spec(tiny_dataset)  # made with workers=1, in-process
    again = generate_dataset(tmp_path / "again", seed=seed, splits=splits, workers=2, progress=False)
    assert _files(again) == _files(tiny_dataset)


def test_images_do_not_depend_on_other_splits_or_counts(tiny_dataset: Path, tmp_path: Path) -> None:
    seed, _ = _spec(tiny_dataset)
    only_val = generate_dataset(tmp_path / "v", seed=seed, splits={"val": 3}, workers=1, progress=False)
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        assert (only_val / "val" / name).read_bytes() == (tiny_dataset / "val" / name).read_bytes()


def test_different_seed_differs(tiny_dataset: Path, tmp_path: Path) -> None:
    seed, _ = _spec(tiny_dataset)
    other = generate_dataset(tmp_path / "o", seed=seed + 1, splits={"val": 3}, workers=1, progress=False)
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        assert (other / "val" / name).read_bytes() != (tiny_dataset / "val" / name).read_bytes()
    assert (
        json.loads((other / "val.json").read_text())["annotations"]
        != json.loads((tiny_dataset / "val.json").read_text())["annotations"][:3]
    )


def test_generate_image_is_a_pure_function_of_the_rng() -> None:
    first, boxes = generate_image(np.random.default_rng(5), 320)
    second, boxes_again = generate_image(np.random.default_rng(5), 320)
    assert first.dtype == np.uint8 and first.shape == (320, 320, 3)
    np.testing.assert_array_equal(first, second)
    assert boxes == boxes_again
    small, _ = generate_image(np.random.default_rng(5), 128)
    assert small.shape == (128, 128, 3)


def test_layout_and_summary(tiny_dataset: Path) -> None:
    summary = json.loads((tiny_dataset / "dataset.json").read_text())
    _, splits = _spec(tiny_dataset)
    assert summary["classes"] == list(CLASSES) and len(CLASSES) >= 8
    assert summary["generator_version"] == synthetic.GENERATOR_VERSION
    for split, count in splits.items():
        coco = json.loads((tiny_dataset / f"{split}.json").read_text())
        assert summary["splits"][split]["images"] == count == len(coco["images"])
        assert summary["splits"][split]["annotations"] == len(coco["annotations"])
        assert sorted(p.name for p in (tiny_dataset / split).iterdir()) == [
            im["file_name"] for im in coco["images"]
        ]
    assert not list(tiny_dataset.parent.glob("synthetic.tmp-*"))


def test_annotations_are_valid_coco(tiny_dataset: Path) -> None:
    used: set[int] = set()
    for split in _spec(tiny_dataset)[1]:
        reference = COCO(str(tiny_dataset / f"{split}.json"))  # independent parser
        assert sorted(reference.getCatIds()) == list(range(1, len(CLASSES) + 1))
        for image_id in reference.getImgIds():
            (image,) = reference.loadImgs([image_id])
            with Image.open(tiny_dataset / split / image["file_name"]) as pixels:
                assert pixels.format == "JPEG" and pixels.size == (image["width"], image["height"]) == (
                    320,
                    320,
                )
            annotations = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
            assert len(annotations) <= synthetic.MAX_OBJECTS
            for annotation in annotations:
                x, y, w, h = annotation["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 320
                assert 1 <= w <= 151 and 1 <= h <= 151 and annotation["iscrowd"] == 0
                assert annotation["area"] == w * h
                used.add(annotation["category_id"])
    assert len(used) >= 8


def test_object_size_distribution() -> None:
    sides = []
    for index in range(120):
        _, annotations = generate_image(image_rng(99, "stats", index), 320)
        sides += [max(a["bbox"][2], a["bbox"][3]) for a in annotations]
    sides = np.array(sides)
    assert len(sides) > 300
    assert 0.07 < (sides <= 20).mean() < 0.3  # ~15% tiny objects
    assert 30 <= np.median(sides) <= 75  # log-uniform 20..150 has median ~55
    assert sides.max() <= 151 and (sides > 100).mean() > 0.05


@pytest.mark.parametrize("name", CLASSES)
def test_box_is_tight_around_the_drawn_shape(name: str) -> None:
    rng = np.random.default_rng(CLASSES.index(name))
    for _ in range(20):
        side = float(rng.uniform(8, 150))
        outer, holes = synthetic._place(synthetic.shape_polygons(name), rng, side)
        offset = np.array([3.3, 2.7]) - outer.min(axis=0)
        alpha, _ = synthetic._rasterise(outer + offset, tuple(h + offset for h in holes), 0)
        drawn = alpha >= synthetic.BOX_ALPHA
        rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
        width, height = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        extent = outer.max(axis=0) - outer.min(axis=0)
        assert math.isclose(max(extent), side)
        assert abs(width - extent[0]) <= 2 and abs(height - extent[1]) <= 2  # integer pixels, thin tips


def test_hidden_objects_lose_their_annotation(monkeypatch: pytest.MonkeyPatch) -> None:
    def count(min_visible: float) -> int:
        monkeypatch.setattr(synthetic, "MIN_VISIBLE", min_visible)
        return sum(len(generate_image(image_rng(7, "occlusion", i), 320)[1]) for i in range(40))

    everything, default, mostly, only_whole = count(0.0), count(synthetic.MIN_VISIBLE), count(0.9), count(1.0)
    assert everything >= default > mostly > only_whole > 0  # objects do get hidden, and are dropped


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"image_size": 10},
        {"splits": {"train": 0}},
        {"splits": {"a/b": 3}},
        {"splits": {}},
        {"workers": 0},
    ],
    ids=["negative-seed", "tiny-image", "empty-split", "bad-split-name", "no-splits", "zero-workers"],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    arguments = {"seed": 0, "splits": {"val": 2}, "progress": False, **kwargs}
    with pytest.raises(SsdoptError):
        generate_dataset(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_never_overwrites_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SsdoptError, match="empty"):
        generate_dataset(tmp_path, seed=0, splits={"val": 1}, workers=1, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SsdoptError):
        generate_dataset(tmp_path / "file", seed=0, splits={"val": 1}, workers=1, progress=False)


def test_failure_leaves_nothing_and_keeps_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    generate_dataset(out, seed=0, splits={"val": 2}, workers=1, progress=False)
    before = _files(out)

    def broken(task):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_render_chunk", broken)
    with pytest.raises(RuntimeError):
        generate_dataset(out, seed=1, splits={"val": 2}, workers=1, progress=False)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "new", seed=1, splits={"val": 2}, workers=1, progress=False)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_rerun_replaces_previous_output(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "ds", seed=0, splits={"val": 2, "test": 1}, workers=1, progress=False)
    generate_dataset(out, seed=0, splits={"val": 1}, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "val", "val.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
