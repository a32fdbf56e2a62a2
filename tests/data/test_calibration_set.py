"""Calibration set selection: stable manifest bytes, class coverage, verified reading, bad inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssdopt.data.calibration import read_calibration_images, select_calibration_set
from ssdopt.data.coco import write_coco
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError

COMMON, RARE = (3, 10, 42), 77  # non-contiguous category ids; RARE appears in two images only


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 tiny PNGs: category 3 everywhere, 10 and 42 sometimes, 77 in images 13 and 27 only."""
    root = tmp_path_factory.mktemp("skewed")
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    images, annotations = [], []
    for image_id in range(1, 31):
        name = f"{image_id:04d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "train" / name)
        images.append({"id": image_id, "file_name": name, "width": 16, "height": 16})
        categories = [3, 3] + ([10] if image_id % 3 == 0 else []) + ([42] if image_id % 7 == 0 else [])
        categories += [RARE] if image_id in (13, 27) else []
        for category_id in categories:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [1, 1, 4, 4],
                    "area": 16,
                    "iscrowd": 0,
                }
            )
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 5,
            "category_id": 42,
            "bbox": [0, 0, 16, 16],
            "area": 256,
            "iscrowd": 1,
        }
    )  # crowd: never counted as an instance
    categories = [{"id": i, "name": f"class{i}"} for i in (*COMMON, RARE)]
    write_coco({"images": images, "annotations": annotations, "categories": categories}, root / "train.json")
    return root


def _select(root: Path, out: Path, **kwargs) -> Path:
    return select_calibration_set(root / "train.json", root / "train", out, **kwargs)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("strategy", ["random", "class-balanced"])
def test_same_inputs_same_manifest_bytes(skewed: Path, tmp_path: Path, strategy: str) -> None:
    first = _select(skewed, tmp_path / "a", num_images=6, strategy=strategy, seed=3)
    second = _select(skewed, tmp_path / "elsewhere" / "b", num_images=6, strategy=strategy, seed=3)
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    assert str(tmp_path) not in (first / "manifest.json").read_text()  # no machine-specific paths
    again = _select(skewed, first, num_images=6, strategy=strategy, seed=3)  # rerun replaces in place
    assert (again / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "elsewhere"]


def test_manifest_content_checked_independently(skewed: Path, tmp_path: Path) -> None:
    out = _select(skewed, tmp_path / "c", num_images=7, strategy="class-balanced", seed=0)
    manifest = _manifest(out)
    assert (manifest["strategy"], manifest["seed"], manifest["num_images"]) == ("class-balanced", 0, 7)
    assert manifest["source"] == {
        "json": "train.json",
        "json_sha256": hashlib.sha256((skewed / "train.json").read_bytes()).hexdigest(),
    }
    entries = manifest["images"]
    assert len(entries) == 7 and entries == sorted(entries, key=lambda e: e["file_name"])
    assert sorted(p.name for p in (out / "images").iterdir()) == [e["file_name"] for e in entries]
    for entry in entries:
        copied = (out / "images" / entry["file_name"]).read_bytes()
        assert copied == (skewed / "train" / entry["file_name"]).read_bytes()
        assert hashlib.sha256(copied).hexdigest() == entry["sha256"]
    reference = COCO(str(skewed / "train.json"))
    ids = [e["image_id"] for e in entries]
    expected = {
        f"class{c}": len(reference.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False)) for c in (*COMMON, RARE)
    }
    assert manifest["class_instances"] == expected


def test_class_balanced_covers_every_class(skewed: Path, tmp_path: Path) -> None:
    random_missed_rare = 0
    for seed in range(5):
        balanced = _manifest(_select(skewed, tmp_path / f"b{seed}", num_images=5, seed=seed))
        assert all(count > 0 for count in balanced["class_instances"].values())
        rand = _manifest(_select(skewed, tmp_path / f"r{seed}", num_images=5, strategy="random", seed=seed))
        random_missed_rare += rand["class_instances"][f"class{RARE}"] == 0
    assert random_missed_rare > 0  # the skew is real: random picks do miss the rare class
    larger = _manifest(_select(skewed, tmp_path / "larger", num_images=12, seed=0))
    assert larger["class_instances"][f"class{RARE}"] == 2  # greed reaches both rare images


def test_class_balanced_on_generated_data(tiny_dataset: Path, tmp_path: Path) -> None:
    out = select_calibration_set(
        tiny_dataset / "train.json", tiny_dataset / "train", tmp_path / "cal", num_images=10
    )
    counts = _manifest(out)["class_instances"]
    assert len(counts) >= 8 and min(counts.values()) > 0


def test_seed_changes_random_selection(skewed: Path, tmp_path: Path) -> None:
    picks = [
        [
            e["image_id"]
            for e in _manifest(_select(skewed, tmp_path / str(s), num_images=5, strategy="random", seed=s))[
                "images"
            ]
        ]
        for s in (0, 1)
    ]
    assert picks[0] != picks[1]


def test_read_calibration_images_in_manifest_order(skewed: Path, tmp_path: Path) -> None:
    out = _select(skewed, tmp_path / "r", num_images=4, strategy="random", seed=0)
    names = [e["file_name"] for e in _manifest(out)["images"]]
    batches = list(read_calibration_images(out, 32))
    assert len(batches) == 4
    for name, pixels in zip(names, batches, strict=True):
        assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
        np.testing.assert_array_equal(pixels, read_image(skewed / "train" / name, 32))


def test_read_detects_tampering_and_missing_manifest(skewed: Path, tmp_path: Path) -> None:
    out = _select(skewed, tmp_path / "t", num_images=3, strategy="random", seed=0)
    victim = out / "images" / _manifest(out)["images"][1]["file_name"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(victim)
    with pytest.raises(SsdoptError, match="sha256"):
        list(read_calibration_images(out, 16))
    victim.unlink()
    with pytest.raises(SsdoptError, match=victim.name):
        list(read_calibration_images(out, 16))
    with pytest.raises(SsdoptError, match="manifest"):
        list(read_calibration_images(tmp_path / "nothing", 16))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"strategy": "best"}, "strategy"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": -3}, "num_images"),
        ({"num_images": 31}, "num_images"),
    ],
    ids=["unknown-strategy", "zero", "negative", "more-than-available"],
)
def test_bad_parameters(skewed: Path, tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(SsdoptError, match=needle):
        _select(skewed, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_empty_image_dir(skewed: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SsdoptError, match="empty"):
        select_calibration_set(skewed / "train.json", tmp_path / "empty", tmp_path / "out", num_images=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_image_leaves_nothing(skewed: Path, tmp_path: Path, damage: str) -> None:
    images = tmp_path / "train"
    images.mkdir()
    for source in (skewed / "train").iterdir():
        (images / source.name).write_bytes(source.read_bytes())
    victim = images / "0013.png"  # holds the rare class: class-balanced always takes it
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"\x89PNG garbage")
    with pytest.raises(SsdoptError, match="0013.png"):
        select_calibration_set(skewed / "train.json", images, tmp_path / "out", num_images=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
