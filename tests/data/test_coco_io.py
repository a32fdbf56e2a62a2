"""COCO I/O: the hand-made fixture's edge cases, pycocotools as reference, round trips, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from ssdopt.data.coco import CocoDataset, load_coco, write_coco
from ssdopt.errors import SsdoptError


def test_fixture_edge_cases(coco_small: Path) -> None:
    dataset = load_coco(coco_small)
    assert dataset.image_dir == coco_small.parent / "instances"
    assert [image.id for image in dataset.images] == [1, 5, 90, 7, 8]
    assert dataset.annotations_for(90) == []  # image without annotations
    crowd = [a for a in dataset.annotations_for(1) if a.iscrowd]
    assert [a.id for a in crowd] == [13] and crowd[0].bbox == (0.0, 0.0, 8.0, 6.0)
    assert dataset.annotations_for(1)[1].bbox == (0.5, 2.25, 4.5, 3.5)
    assert dataset.label_map() == {1: 1, 5: 2, 90: 3}
    assert dataset.class_names() == ["__background__", "person", "airplane", "toothbrush"]
    assert dataset.image_path(dataset.images[0]) == coco_small.parent / "instances" / "rgb.png"
    assert dataset.image_path(dataset.images[0]).is_file()


def test_fixture_agrees_with_pycocotools(coco_small: Path) -> None:
    reference = COCO(str(coco_small))
    dataset = load_coco(coco_small)
    assert sorted(reference.getImgIds()) == sorted(image.id for image in dataset.images)
    assert sorted(reference.getCatIds()) == sorted(dataset.label_map())
    for image in dataset.images:
        expected = reference.loadAnns(reference.getAnnIds(imgIds=[image.id], iscrowd=None))
        got = dataset.annotations_for(image.id)
        assert [a["id"] for a in expected] == [a.id for a in got]
        assert [tuple(float(v) for v in a["bbox"]) for a in expected] == [a.bbox for a in got]
        assert [a["iscrowd"] for a in expected] == [a.iscrowd for a in got]


def test_round_trip_fixture(coco_small: Path, tmp_path: Path) -> None:
    first = load_coco(coco_small)
    written = write_coco(first, tmp_path / "copy.json")
    assert written == tmp_path / "copy.json"
    second = load_coco(written, first.image_dir)
    assert (second.images, second.annotations, second.categories) == (
        first.images,
        first.annotations,
        first.categories,
    )
    assert second.label_map() == first.label_map()
    COCO(str(written))  # and pycocotools still reads what we wrote


def test_round_trip_generated(tiny_dataset: Path, tmp_path: Path) -> None:
    first = load_coco(tiny_dataset / "val.json")
    assert first.image_dir == tiny_dataset / "val"
    second = load_coco(write_coco(first, tmp_path / "val.json"), first.image_dir)
    assert second == CocoDataset(
        second.path, first.image_dir, first.images, first.annotations, first.categories
    )
    assert second.images == first.images and second.annotations == first.annotations


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("previous")
    with pytest.raises(ValueError):
        write_coco({"images": [], "annotations": [{"area": float("nan")}], "categories": []}, path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_optional_fields_default(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 3, "file_name": "a.png", "width": 4, "height": 4}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 2, "bbox": [0, 0, 2, 3]}],
        "categories": [{"id": 2, "name": "thing"}],
    }
    path = tmp_path / "minimal.json"
    path.write_text(json.dumps(data))
    (annotation,) = load_coco(path, tmp_path).annotations
    assert annotation.area == 6.0 and annotation.iscrowd == 0


def _valid() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("images", "id"),
        ("images", "file_name"),
        ("images", "width"),
        ("images", "height"),
        ("annotations", "id"),
        ("annotations", "image_id"),
        ("annotations", "category_id"),
        ("annotations", "bbox"),
        ("categories", "id"),
        ("categories", "name"),
    ],
)
def test_missing_field_names_file_and_field(tmp_path: Path, section: str, field: str) -> None:
    data = _valid()
    del data[section][0][field]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SsdoptError) as error:
        load_coco(path)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message and f"{section}[0]" in message


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("annotations"), "'annotations'"),
        (lambda d: d.update(images=[]), "empty"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, 2]), "bbox"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 2]), "bbox"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, "2", 2]), "bbox"),
        (lambda d: d["annotations"][0].update(image_id=99), "image_id 99"),
        (lambda d: d["annotations"][0].update(category_id=7), "category_id 7"),
        (lambda d: d["images"].append(dict(d["images"][0])), "unique image ids"),
        (lambda d: d["images"][0].update(width="4"), "'width'"),
    ],
    ids=[
        "no-annotations",
        "empty-split",
        "bbox-3",
        "bbox-negative",
        "bbox-string",
        "dangling-image",
        "dangling-category",
        "duplicate-image",
        "string-width",
    ],
)
def test_bad_content(tmp_path: Path, mutate, needle: str) -> None:
    data = _valid()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SsdoptError, match="bad.json") as error:
        load_coco(path)
    assert needle in str(error.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""], ids=["syntax", "list", "empty-file"])
def test_not_a_coco_json(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(SsdoptError, match="x.json"):
        load_coco(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SsdoptError, match="nowhere.json"):
        load_coco(tmp_path / "nowhere.json")


def _split(json_path: Path, image_dir: Path) -> Path:
    """A one-image COCO split at `json_path` whose image lies in `image_dir`."""
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(image_dir / "000001.png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": 1, "file_name": "000001.png", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
        ],
        "categories": [{"id": 3, "name": "car"}],
    }
    json_path.write_text(json.dumps(data))
    return json_path


@pytest.mark.parametrize(
    ("json_rel", "images_rel", "given"),
    [
        ("val.json", "val", "."),  # ssdopt's own layout, folder given
        ("annotations/instances_val2017.json", "val2017", "."),  # COCO 2017
        ("annotations/instances_val.json", "images", "."),  # annotations/ + images/
        ("annotations/instances_val.json", "images/val", "."),
        ("annotations/instances_val2017.json", "val2017", "annotations/instances_val2017.json"),  # the json
    ],
)
def test_dataset_layouts_users_have(tmp_path: Path, json_rel: str, images_rel: str, given: str) -> None:
    from ssdopt.data.coco import load_split, resolve_split

    json_path = _split(tmp_path / json_rel, tmp_path / images_rel)
    assert resolve_split(tmp_path / given, "val") == (json_path, tmp_path / images_rel)
    ds = load_split(tmp_path / given, "val")
    assert ds.image_path(ds.images[0]).is_file() and ds.class_names() == ["__background__", "car"]


def test_explicit_images_folder_wins(tmp_path: Path) -> None:
    from ssdopt.data.coco import resolve_split

    json_path = _split(tmp_path / "labels.json", tmp_path / "photos")
    assert resolve_split(json_path, images=tmp_path / "photos") == (json_path, tmp_path / "photos")
    assert resolve_split(json_path)[1] == tmp_path / "labels"  # nothing holds it: the default, named on read


def test_a_folder_without_a_split_is_refused(tmp_path: Path) -> None:
    from ssdopt.data.coco import resolve_split

    _split(tmp_path / "annotations/instances_train2017.json", tmp_path / "train2017")
    with pytest.raises(SsdoptError, match="instances_val"):
        resolve_split(tmp_path, "val")
