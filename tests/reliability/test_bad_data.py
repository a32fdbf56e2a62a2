"""Bad data: calibration sets, images and COCO json. Refused inputs exit 2 with a message naming the
file and leave no output; grayscale / RGBA / 16-bit images are accepted by the documented rule of
ssdopt.data.images (grey -> three equal channels, alpha dropped, 16-bit scaled by 255/65535)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssdopt.fileio import sha256_file


def _calibration_copy(tiny_calibration: Path, directory: Path) -> Path:
    return Path(shutil.copytree(tiny_calibration, directory))


def _rewrite_manifest(calibration: Path) -> None:
    """Make the manifest agree with the files again (so the damage is found by decoding, not by sha)."""
    manifest = json.loads((calibration / "manifest.json").read_text())
    for entry in manifest["images"]:
        entry["sha256"] = sha256_file(calibration / "images" / entry["file_name"])
    (calibration / "manifest.json").write_text(json.dumps(manifest))


def _quantize(cli, tiny_export, calibration: Path):
    return cli(
        "quantize",
        "--precision",
        "int8",
        "--onnx",
        str(tiny_export.model),
        "--calibration",
        str(calibration),
        "--out",
        "quantized/int8",
    )


def test_empty_calibration_directory(workdir, cli, refused, snapshot, tiny_export) -> None:
    empty = workdir.parent / "calibration"
    empty.mkdir()
    before = snapshot(workdir)
    refused(
        _quantize(cli, tiny_export, empty),
        "manifest.json",
        "calibration manifest",
        "ssdopt data calibration",
        root=workdir,
        before=before,
    )


def test_fewer_calibration_images_than_asked(
    workdir, cli, refused, snapshot, tiny_export, tiny_calibration
) -> None:
    (workdir / "params.yaml").write_text("quantize:\n  num_images: 50\n")
    before = snapshot(workdir)
    refused(
        _quantize(cli, tiny_export, tiny_calibration),
        "num_images=50",
        "1..12",
        "lower num_images",
        root=workdir,
        before=before,
    )


def test_calibration_image_listed_but_missing(
    workdir, cli, refused, snapshot, tiny_export, tiny_calibration
) -> None:
    calibration = _calibration_copy(tiny_calibration, workdir.parent / "calibration")
    (calibration / "images" / "0000.jpg").unlink()
    before = snapshot(workdir)
    refused(
        _quantize(cli, tiny_export, calibration),
        "0000.jpg",
        "listed in the manifest",
        root=workdir,
        before=before,
    )


def test_calibration_image_changed_since_the_manifest(
    workdir, cli, refused, snapshot, tiny_export, tiny_calibration, image_file
) -> None:
    calibration = _calibration_copy(tiny_calibration, workdir.parent / "calibration")
    image_file(calibration / "images" / "0000.jpg", size=64)
    before = snapshot(workdir)
    refused(
        _quantize(cli, tiny_export, calibration),
        "0000.jpg",
        "as recorded in the manifest",
        "dvc checkout",
        root=workdir,
        before=before,
    )


def test_corrupt_jpeg_in_the_calibration_set(
    workdir, cli, refused, snapshot, tiny_export, tiny_calibration
) -> None:
    calibration = _calibration_copy(tiny_calibration, workdir.parent / "calibration")
    jpeg = calibration / "images" / "0000.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # header survives, the scan data does not
    _rewrite_manifest(calibration)
    before = snapshot(workdir)
    refused(
        _quantize(cli, tiny_export, calibration),
        "0000.jpg",
        "readable image",
        "cannot be decoded",
        root=workdir,
        before=before,
    )


def _coco_split(root: Path, count: int, image_file) -> Path:  # noqa: ANN001
    images, annotations = [], []
    for i in range(count):
        image_file(root / "train" / f"{i}.png", size=32)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 10, 10]})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (root / "train.json").write_text(json.dumps(data))
    return root


def test_calibration_asks_for_more_images_than_the_split_has(
    workdir, cli, refused, snapshot, image_file
) -> None:
    dataset = _coco_split(workdir.parent / "dataset", 3, image_file)
    before = snapshot(workdir)
    result = cli(
        "data", "calibration", "--dataset", str(dataset), "--out", "calibration", "--num-images", "50"
    )
    refused(result, "num_images", "at most the 3 images", "ask for fewer", root=workdir, before=before)


def test_calibration_selection_refuses_a_corrupt_image(workdir, cli, refused, snapshot, image_file) -> None:
    dataset = _coco_split(workdir.parent / "dataset", 3, image_file)
    for png in (dataset / "train").iterdir():
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    before = snapshot(workdir)
    result = cli(
        "data", "calibration", "--dataset", str(dataset), "--out", "calibration", "--num-images", "2"
    )
    refused(result, ".png", "readable image", root=workdir, before=before)


def test_detect_refuses_a_corrupt_jpeg_and_writes_nothing(
    workdir, cli, refused, snapshot, tiny_engine, image_file
) -> None:
    good = image_file(workdir.parent / "in" / "good.png")
    bad = workdir.parent / "in" / "bad.jpg"
    image_file(workdir.parent / "tmp.jpg")
    bad.write_bytes((workdir.parent / "tmp.jpg").read_bytes()[:200])
    before = snapshot(workdir)
    result = cli("detect", "--engine", str(tiny_engine), "--out", "detections", str(good), str(bad))
    refused(result, "bad.jpg", "readable image", root=workdir, before=before)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_detect_accepts_grey_rgba_and_16_bit_images(
    workdir, cli, accepted, tiny_engine, image_file, mode
) -> None:
    image = image_file(workdir.parent / "in" / "picture.png", mode=mode)
    result = cli(
        "detect", "--engine", str(tiny_engine), "--out", "detections", "--min-score", "0", str(image)
    )
    assert result.code == 0, result.err
    record = json.loads((workdir / "detections" / "picture.json").read_text())
    assert (record["width"], record["height"]) == (48, 48)
    assert (workdir / "detections" / "picture.png").is_file()
    accepted(
        f"ssdopt detect --engine <engine> <{mode} PNG>",
        f"exit 0; {mode} converted to RGB (grey replicated, alpha dropped, 16-bit x 255/65535); "
        f"{len(record['detections'])} detections written",
    )


def test_calibration_reader_converts_grey_rgba_and_16_bit(tmp_path: Path, accepted, image_file) -> None:
    from PIL import Image

    from ssdopt.quantize.calibration_reader import calibration_reader

    images = tmp_path / "calibration" / "images"
    entries = []
    for i, mode in enumerate(["L", "RGBA", "I;16", "RGB"]):
        path = image_file(images / f"{i}.png", mode=mode, size=64)
        entries.append({"file_name": path.name, "image_id": i, "sha256": sha256_file(path)})
    manifest = {"images": entries, "num_images": 4}
    (tmp_path / "calibration" / "manifest.json").write_text(json.dumps(manifest))
    batches = calibration_reader(tmp_path / "calibration", 64).arrays()
    assert [b.shape for b in batches] == [(1, 3, 64, 64)] * 4
    grey, rgba, sixteen, rgb = (b[0] for b in batches)
    expected_grey = np.asarray(Image.open(images / "0.png"), np.float32) / 255
    for channel in grey:
        np.testing.assert_array_equal(channel, expected_grey)
    rgb_of_rgba = np.asarray(Image.open(images / "1.png").convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(rgba, rgb_of_rgba)
    raw16 = np.asarray(Image.open(images / "2.png"), np.float64)
    np.testing.assert_allclose(sixteen[0], np.rint(raw16 * 255 / 65535) / 255, atol=1e-6)
    assert all(np.isfinite(b).all() and 0 <= b.min() and b.max() <= 1 for b in (grey, rgba, sixteen, rgb))
    accepted(
        "calibration_reader(<set with L, RGBA, I;16 and RGB PNGs>, 64)",
        "4 batches float32 [1, 3, 64, 64] in [0, 1]: grey replicated, alpha dropped, 16-bit x 255/65535",
    )


def _evaluate(cli, engine: Path, dataset: Path):
    return cli("evaluate", str(engine), "--dataset", str(dataset), "--out", "metrics.json")


@pytest.mark.parametrize(
    ("name", "text", "mention"),
    [
        ("syntax", '{"images": [', "valid JSON"),
        ("list", "[1, 2, 3]", "a COCO json object"),
        ("no_annotations_field", '{"images": [], "categories": []}', "top-level field 'annotations'"),
        (
            "bbox_missing",
            '{"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],'
            ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],'
            ' "categories": [{"id": 1, "name": "x"}]}',
            "field 'bbox'",
        ),
        (
            "dangling_image_id",
            '{"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],'
            ' "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2]}],'
            ' "categories": [{"id": 1, "name": "x"}]}',
            "image_id 7",
        ),
    ],
    ids=["syntax", "list", "no_annotations_field", "bbox_missing", "dangling_image_id"],
)
def test_malformed_coco_json(workdir, cli, refused, snapshot, tiny_engine, name, text, mention) -> None:
    dataset = workdir.parent / f"{name}.json"
    dataset.write_text(text)
    before = snapshot(workdir)
    refused(_evaluate(cli, tiny_engine, dataset), f"{name}.json", mention, root=workdir, before=before)


def test_coco_json_naming_a_missing_image(workdir, cli, refused, snapshot, tiny_engine) -> None:
    dataset = workdir.parent / "val.json"
    dataset.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "gone.png", "width": 8, "height": 8}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    before = snapshot(workdir)
    refused(_evaluate(cli, tiny_engine, dataset), "gone.png", "does not exist", root=workdir, before=before)


def test_manifest_digest_helper_matches_hashlib(tmp_path: Path) -> None:
    """The one sha256 helper (ssdopt.fileio) is what manifests and engines record."""
    path = tmp_path / "x.bin"
    path.write_bytes(b"ssdopt" * 1000)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
