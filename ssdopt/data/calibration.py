"""The calibration set: N training images chosen for INT8 calibration, with a stable manifest.

The directory (images/ + manifest.json) is a DVC stage output; its DVC md5 is the
calibration-set version every later step records, so the manifest holds no paths, times or
anything else that changes when the same selection is made on another machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from ssdopt.data import atomic_output_dir
from ssdopt.data.coco import CocoDataset, CocoImage, load_coco
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

STRATEGIES = ("random", "class-balanced")
MANIFEST = "manifest.json"
IMAGES = "images"


def _select_random(dataset: CocoDataset, num_images: int, rng: np.random.Generator) -> list[CocoImage]:
    images = sorted(dataset.images, key=lambda image: image.id)
    chosen = rng.choice(len(images), size=num_images, replace=False)
    return [images[int(i)] for i in chosen]


def _select_class_balanced(
    dataset: CocoDataset, num_images: int, rng: np.random.Generator
) -> list[CocoImage]:
    """Greedy: repeatedly take an unused image holding the class with the fewest instances so far.

    Ties between classes go to the lowest category id; among the images of a class, the order is a
    seeded shuffle. When no unused image holds any class, the rest is filled at random.
    """
    images = sorted(dataset.images, key=lambda image: image.id)
    category_ids = sorted(int(category["id"]) for category in dataset.categories)
    instances: list[dict[int, int]] = []  # per image: category_id -> non-crowd instances
    for image in images:
        counts: dict[int, int] = {}
        for annotation in dataset.annotations_for(image.id):
            if not annotation.iscrowd:
                counts[annotation.category_id] = counts.get(annotation.category_id, 0) + 1
        instances.append(counts)
    order = rng.permutation(len(images))
    queues: dict[int, list[int]] = {category_id: [] for category_id in category_ids}
    for i in order.tolist():
        for category_id in instances[i]:
            queues[category_id].append(i)
    cursor = dict.fromkeys(category_ids, 0)
    totals = dict.fromkeys(category_ids, 0)
    used: set[int] = set()
    picked: list[int] = []
    live = [category_id for category_id in category_ids if queues[category_id]]
    while len(picked) < num_images and live:
        category_id = min(live, key=lambda c: (totals[c], c))
        queue = queues[category_id]
        while cursor[category_id] < len(queue) and queue[cursor[category_id]] in used:
            cursor[category_id] += 1
        if cursor[category_id] == len(queue):
            live.remove(category_id)
            continue
        i = queue[cursor[category_id]]
        used.add(i)
        picked.append(i)
        for c, n in instances[i].items():
            totals[c] += n
    for i in order.tolist():
        if len(picked) == num_images:
            break
        if i not in used:
            used.add(i)
            picked.append(i)
    return [images[i] for i in picked]


def _check_arguments(dataset: CocoDataset, image_dir: Path, num_images: int, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SsdoptError("strategy", f"one of {', '.join(STRATEGIES)}, got {strategy!r}", "pick one of them")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images <= 0:
        raise SsdoptError("num_images", f"a positive number of images, got {num_images!r}", "pass e.g. 512")
    if not image_dir.is_dir() or not any(image_dir.iterdir()):
        raise SsdoptError(
            image_dir, "a directory holding the split's images", "run `ssdopt data generate` first"
        )
    if len(dataset.images) < num_images:
        raise SsdoptError(
            "num_images",
            f"at most the {len(dataset.images)} images of {dataset.path}, got {num_images}",
            "ask for fewer images or generate a larger train split",
        )


def _safe_relative(file_name: str, json_path: Path) -> PurePosixPath:
    relative = PurePosixPath(file_name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise SsdoptError(json_path, f"relative image file names, got {file_name!r}", "fix the COCO json")
    return relative


def select_calibration_set(
    train_json: Path,
    image_dir: Path,
    out: Path,
    num_images: int = 512,
    strategy: str = "class-balanced",
    seed: int = 0,
) -> Path:
    """Copy `num_images` training images into out/images/ and write out/manifest.json; returns `out`.

    Atomic (temp dir, then rename) and stable: the same inputs give the same manifest bytes. Every
    selected image is decoded once, so a corrupt file fails here, not during calibration.
    """
    train_json, image_dir, out = Path(train_json), Path(image_dir), Path(out)
    dataset = load_coco(train_json, image_dir)
    _check_arguments(dataset, image_dir, num_images, strategy)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), STRATEGIES.index(strategy)]))
    if strategy == "random":
        selected = _select_random(dataset, int(num_images), rng)
    else:
        selected = _select_class_balanced(dataset, int(num_images), rng)

    names = dict(zip(dataset.label_map(), dataset.class_names()[1:], strict=True))
    class_counts = dict.fromkeys(names.values(), 0)
    for image in selected:
        for annotation in dataset.annotations_for(image.id):
            if not annotation.iscrowd:
                class_counts[names[annotation.category_id]] += 1

    with atomic_output_dir(out, MANIFEST) as tmp:
        entries = []
        for image in selected:
            relative = _safe_relative(image.file_name, train_json)
            source = dataset.image_path(image)
            read_image(source)  # fails with the file named if it is missing or corrupt
            target = tmp / IMAGES / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            entries.append({"file_name": str(relative), "image_id": image.id, "sha256": sha256_file(target)})
        entries.sort(key=lambda entry: (entry["file_name"], entry["image_id"]))
        manifest = {
            "strategy": strategy,
            "seed": int(seed),
            "num_images": int(num_images),
            "source": {"json": train_json.name, "json_sha256": sha256_file(train_json)},
            "class_instances": class_counts,
            "images": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_manifest(calib_dir: Path) -> dict:
    """The manifest of a calibration set, checked for the fields readers need."""
    path = Path(calib_dir) / MANIFEST
    if not path.is_file():
        raise SsdoptError(
            path, "a calibration manifest", "run `ssdopt data calibration` (or `dvc repro calibration`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SsdoptError(path, f"valid JSON ({exc})", "rerun `ssdopt data calibration`") from exc
    images = manifest.get("images") if isinstance(manifest, dict) else None
    if (
        not isinstance(images, list)
        or not images
        or not all(
            isinstance(e, dict) and isinstance(e.get("file_name"), str) and isinstance(e.get("sha256"), str)
            for e in images
        )
    ):
        raise SsdoptError(
            path, "a non-empty 'images' list of {file_name, sha256}", "rerun `ssdopt data calibration`"
        )
    return manifest


def read_calibration_images(calib_dir: Path, size: int) -> Iterator[np.ndarray]:
    """Yield each calibration image as float32 [3, size, size] (read_image), in manifest order.

    Each file's sha256 is checked against the manifest first: a calibration set that silently
    changed would silently change the INT8 scales.
    """
    calib_dir = Path(calib_dir)
    manifest = read_manifest(calib_dir)
    for entry in manifest["images"]:
        path = calib_dir / IMAGES / _safe_relative(entry["file_name"], calib_dir / MANIFEST)
        if not path.is_file():
            raise SsdoptError(
                path, "a calibration image listed in the manifest", "rerun `ssdopt data calibration`"
            )
        if sha256_file(path) != entry["sha256"]:
            raise SsdoptError(
                path,
                f"sha256 {entry['sha256']} as recorded in the manifest",
                "the file changed; rerun `ssdopt data calibration` or `dvc checkout`",
            )
        yield read_image(path, size)
