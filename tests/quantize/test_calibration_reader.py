"""Calibration batches from the DVC calibration set, chunked; the set's version."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssdopt.errors import SsdoptError
from ssdopt.quantize.calibration_reader import array_reader, calibration_reader, calibration_version


def test_batches_cover_the_set_in_manifest_order(tiny_calibration) -> None:
    reader = calibration_reader(tiny_calibration, 64, batch_size=5)
    batches = reader.arrays()
    assert [b.shape for b in batches] == [(5, 3, 64, 64), (5, 3, 64, 64), (2, 3, 64, 64)]
    manifest = json.loads((tiny_calibration / "manifest.json").read_text())
    first = np.asarray(
        Image.open(tiny_calibration / "images" / manifest["images"][0]["file_name"]).convert("RGB")
    )
    np.testing.assert_allclose(batches[0][0], first.transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert all(b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1 for b in batches)


def test_chunks_partition_the_batches(tiny_calibration) -> None:
    reader = calibration_reader(tiny_calibration, 64, num_images=10, batch_size=2)
    chunks = list(reader.chunks(images_per_chunk=4))
    sizes = []
    for chunk in chunks:
        sizes.append(0)
        while (batch := chunk.get_next()) is not None:
            sizes[-1] += batch["images"].shape[0]
    assert sizes == [4, 4, 2]


def test_num_images_beyond_the_set_is_refused(tiny_calibration) -> None:
    with pytest.raises(SsdoptError, match="1..12"):
        calibration_reader(tiny_calibration, 64, num_images=13)


def test_version_is_the_manifest_hash_and_changes_with_it(tiny_calibration, tmp_path) -> None:
    version = calibration_version(tiny_calibration)
    assert version["images_in_set"] == 12 and len(version["manifest_sha256"]) == 64
    copy = tmp_path / "cal"
    copy.mkdir()
    (copy / "images").symlink_to(tiny_calibration / "images")
    manifest = json.loads((tiny_calibration / "manifest.json").read_text())
    manifest["images"] = manifest["images"][:6]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert calibration_version(copy)["manifest_sha256"] != version["manifest_sha256"]


def test_array_reader_rewinds() -> None:
    reader = array_reader(np.zeros((3, 3, 8, 8), dtype=np.float32), batch_size=2)
    assert len(reader.arrays()) == 2 and len(reader.arrays()) == 2
