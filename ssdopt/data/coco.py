"""COCO-format detection datasets: read any (real COCO val2017 included), write ours.

Only the detection fields are kept: segmentation, keypoints, licenses, info and any other extra
field are ignored on reading. Boxes are COCO (x, y, w, h) in pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssdopt.errors import SsdoptError
from ssdopt.fileio import atomic_write

BACKGROUND_NAME = "__background__"


@dataclass(frozen=True)
class CocoImage:
    """One entry of `images`."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoAnnotation:
    """One entry of `annotations`; bbox is (x, y, w, h) in pixels."""

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int


@dataclass
class CocoDataset:
    """A COCO detection split: its json file, its image folder and the parsed entries."""

    path: Path
    image_dir: Path
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[dict]
    _by_image: dict[int, list[CocoAnnotation]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def annotations_for(self, image_id: int) -> list[CocoAnnotation]:
        """The annotations of one image (crowd boxes included), in file order; [] if it has none."""
        if self._by_image is None:
            index: dict[int, list[CocoAnnotation]] = {}
            for annotation in self.annotations:
                index.setdefault(annotation.image_id, []).append(annotation)
            self._by_image = index
        return list(self._by_image.get(image_id, []))

    def label_map(self) -> dict[int, int]:
        """category_id -> contiguous training label 1..N in order of category id; 0 is background."""
        ids = sorted(int(category["id"]) for category in self.categories)
        return {category_id: label for label, category_id in enumerate(ids, start=1)}

    def class_names(self) -> list[str]:
        """Names indexed by training label: [0] is "__background__", then by category id."""
        by_id = {int(category["id"]): str(category["name"]) for category in self.categories}
        return [BACKGROUND_NAME] + [by_id[category_id] for category_id in sorted(by_id)]

    def image_path(self, image: CocoImage) -> Path:
        """Where the pixels of `image` live."""
        return self.image_dir / image.file_name


def _fail_field(path: Path, where: str, name: str, expected: str) -> SsdoptError:
    return SsdoptError(
        path,
        f"COCO detection json whose {where} has field '{name}' ({expected})",
        f"add '{name}' to every entry of {where.split('[')[0]} or regenerate the file",
    )


def _get(entry: Any, path: Path, where: str, name: str, kind: type, expected: str) -> Any:
    """Required field `name` of one json entry, converted to `kind`; a clear error if absent/wrong."""
    if not isinstance(entry, dict):
        raise SsdoptError(path, f"{where} to be a json object", "fix the file or regenerate it")
    if name not in entry:
        raise _fail_field(path, where, name, expected)
    value = entry[name]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise _fail_field(path, where, name, expected)
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail_field(path, where, name, expected)
        return float(value)
    if not isinstance(value, kind):
        raise _fail_field(path, where, name, expected)
    return value


def _parse_bbox(entry: dict, path: Path, where: str) -> tuple[float, float, float, float]:
    bbox = _get(entry, path, where, "bbox", list, "a list [x, y, w, h] of 4 numbers")
    ok = len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
    )
    if not ok or bbox[2] < 0 or bbox[3] < 0:
        raise _fail_field(path, where, "bbox", "a list [x, y, w, h] of 4 finite numbers, w and h >= 0")
    return (float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3]))


def _read_json(json_path: Path) -> dict:
    if not json_path.is_file():
        raise SsdoptError(
            json_path, "an existing COCO json file", "check the path or run `ssdopt data generate`"
        )
    try:
        with open(json_path, "rb") as stream:
            data = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SsdoptError(json_path, f"valid JSON ({exc})", "restore or regenerate the file") from exc
    if not isinstance(data, dict):
        raise SsdoptError(
            json_path, "a COCO json object with images, annotations, categories", "regenerate it"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise SsdoptError(json_path, f"COCO detection json with top-level field '{key}'", "regenerate it")
        if not isinstance(data[key], list):
            raise SsdoptError(json_path, f"top-level field '{key}' to be a list", "regenerate it")
    return data


def load_coco(json_path: Path, image_dir: Path | None = None) -> CocoDataset:
    """Parse a COCO detection json; `image_dir` defaults to the json path without suffix.

    Accepts crowd boxes, images without annotations, non-contiguous category ids and extra fields.
    Missing required fields, dangling ids and an empty images list raise SsdoptError.
    """
    json_path = Path(json_path)
    data = _read_json(json_path)
    if not data["images"]:
        raise SsdoptError(json_path, "a non-empty split (the images list is empty)", "regenerate the dataset")

    images: list[CocoImage] = []
    image_ids: set[int] = set()
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        image = CocoImage(
            id=_get(entry, json_path, where, "id", int, "an integer id"),
            file_name=_get(entry, json_path, where, "file_name", str, "a relative file name"),
            width=_get(entry, json_path, where, "width", int, "an integer width in pixels"),
            height=_get(entry, json_path, where, "height", int, "an integer height in pixels"),
        )
        if image.id in image_ids:
            raise SsdoptError(json_path, f"unique image ids ({where} repeats id {image.id})", "regenerate it")
        image_ids.add(image.id)
        images.append(image)

    categories: list[dict] = []
    category_ids: set[int] = set()
    for i, entry in enumerate(data["categories"]):
        where = f"categories[{i}]"
        category_id = _get(entry, json_path, where, "id", int, "an integer id")
        name = _get(entry, json_path, where, "name", str, "a class name")
        if category_id in category_ids:
            raise SsdoptError(
                json_path, f"unique category ids ({where} repeats {category_id})", "fix the file"
            )
        category_ids.add(category_id)
        categories.append({**entry, "id": category_id, "name": name})

    annotations: list[CocoAnnotation] = []
    for i, entry in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        bbox = _parse_bbox(entry, json_path, where)
        annotation = CocoAnnotation(
            id=_get(entry, json_path, where, "id", int, "an integer id"),
            image_id=_get(entry, json_path, where, "image_id", int, "the id of an image"),
            category_id=_get(entry, json_path, where, "category_id", int, "the id of a category"),
            bbox=bbox,
            area=_get(entry, json_path, where, "area", float, "a number")
            if "area" in entry
            else bbox[2] * bbox[3],
            iscrowd=_get(entry, json_path, where, "iscrowd", int, "0 or 1") if "iscrowd" in entry else 0,
        )
        if annotation.image_id not in image_ids:
            raise SsdoptError(
                json_path,
                f"{where}.image_id {annotation.image_id} to name an image",
                "fix or regenerate the file",
            )
        if annotation.category_id not in category_ids:
            raise SsdoptError(
                json_path, f"{where}.category_id {annotation.category_id} to name a category", "fix the file"
            )
        annotations.append(annotation)

    return CocoDataset(
        path=json_path,
        image_dir=Path(image_dir) if image_dir is not None else json_path.with_suffix(""),
        images=images,
        annotations=annotations,
        categories=categories,
    )


def coco_dict(dataset: CocoDataset) -> dict:
    """The json-ready dict of a dataset (detection fields only)."""
    return {
        "images": [
            {"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height}
            for im in dataset.images
        ],
        "annotations": [
            {
                "id": an.id,
                "image_id": an.image_id,
                "category_id": an.category_id,
                "bbox": [float(v) for v in an.bbox],
                "area": float(an.area),
                "iscrowd": an.iscrowd,
            }
            for an in dataset.annotations
        ],
        "categories": [dict(category) for category in dataset.categories],
    }


def write_coco(dataset: CocoDataset | dict, path: Path) -> Path:
    """Write a COCO json atomically (temp file beside it, then rename); returns `path`."""
    path = Path(path)
    data = coco_dict(dataset) if isinstance(dataset, CocoDataset) else dataset
    text = json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _image_dir_candidates(json_path: Path, split: str) -> list[Path]:
    """Where the COCO layouts people use keep the images of `json_path` (first match wins)."""
    stem = json_path.stem.removeprefix("instances_")  # instances_val2017 -> val2017
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    return [
        json_path.with_suffix(""),  # ssdopt's own layout: <root>/<split>.json beside <root>/<split>/
        root / stem,  # COCO: annotations/instances_val2017.json beside val2017/
        root / "images" / stem,
        root / "images" / split,
        root / "images",
    ]


def resolve_split(
    path: Path | str, split: str = "val", images: Path | str | None = None
) -> tuple[Path, Path]:
    """(annotation json, image folder) of a split, for every command's `--dataset`:

    - a json file (its images in `images`, or found as below);
    - a folder in ssdopt's layout: `<split>.json` beside `<split>/`;
    - a folder in COCO's layout: `annotations/instances_<split>*.json` with `<split>*/` or `images/`.
    The image folder is the first candidate that holds the split's first image (else the first
    that exists: reading then names the missing image and the fix).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / f"{split}.json"] if (path / f"{split}.json").is_file() else []
        found = found or sorted((path / "annotations").glob(f"instances_{split}*.json"))
        if len(found) != 1:
            raise SsdoptError(
                path,
                f"a COCO dataset folder holding {split}.json or annotations/instances_{split}*.json "
                f"(found {len(found)})",
                "pass the annotation json itself (and --images) or another --split",
            )
        path = found[0]
    if not path.is_file():
        raise SsdoptError(path, "a COCO annotation json or a dataset folder", "check the --dataset path")
    if images is not None:
        return path, Path(images)
    candidates = list(dict.fromkeys(_image_dir_candidates(path, split)))
    first = _first_file_name(path)
    for candidate in candidates:
        if first is not None and (candidate / first).is_file():
            return path, candidate
    # none holds it: the first folder there is (or ssdopt's default), and reading the image names
    # the missing file; a malformed json is reported by load_coco with what is wrong in it
    existing = [c for c in candidates if c.is_dir()]
    return path, existing[0] if existing else candidates[0]


def _first_file_name(json_path: Path) -> str | None:
    """file_name of the first image, or None where the file is not that well formed (load_coco then
    says what is wrong with it)."""
    try:
        name = _read_json(json_path)["images"][0]["file_name"]
    except (SsdoptError, KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) else None


def load_split(path: Path | str, split: str = "val", images: Path | str | None = None) -> CocoDataset:
    """load_coco of whatever `resolve_split` finds at `path`."""
    json_path, image_dir = resolve_split(path, split, images)
    return load_coco(json_path, image_dir)
