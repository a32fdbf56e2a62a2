"""Calibration images for ONNX Runtime's calibrators, in bounded chunks, plus the set's version.

Calibration collects every intermediate tensor of every batch it is fed; fed 512 images at once
that is gigabytes. `chunks()` hands the calibrator a fresh reader per chunk instead, and the
calibrator merges ranges/histograms across calls. (ORT's own `max_intermediate_outputs` option
for min-max discards the collected outputs without using them: not used here.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ssdopt.errors import SsdoptError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationSpec:
    """Where the INT8 calibration images come from and how ranges are computed.

    `directory` holds images/ + manifest.json (the DVC stage output). `num_bins` >= 2048 makes
    entropy calibration real (ORT's default of 128 bins leaves a single candidate threshold).
    """

    directory: Path = Path("data/calibration")
    method: str = "minmax"  # best output SNR of the three on ssdlite here (int8.py); re-pick by mAP
    num_images: int | None = None
    num_bins: int = 2048
    num_quantized_bins: int = 128
    percentile: float = 99.999
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise SsdoptError(
                f"calibration method '{self.method}'",
                f"one of {', '.join(CALIBRATION_METHODS)}",
                "fix build.calibration",
            )
        if self.method == "entropy" and self.num_bins < 2048:
            raise SsdoptError(
                f"calibration num_bins={self.num_bins}",
                ">= 2048 for entropy (fewer bins leave too few candidate thresholds: a silent min-max)",
                "raise num_bins or use method minmax",
            )


class ImageBatches(CalibrationDataReader):
    """Yields {input_name: float32 [batch, 3, H, W]} from an iterable of float32 [3, H, W] images."""

    def __init__(
        self, images: Callable[[], Iterable[np.ndarray]], input_name: str, batch_size: int = 1
    ) -> None:
        self._images = images
        self.input_name = input_name
        self.batch_size = int(batch_size)
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        batch: list[np.ndarray] = []
        for image in self._images():
            batch.append(np.asarray(image, dtype=np.float32))
            if len(batch) == self.batch_size:
                yield {self.input_name: np.stack(batch)}
                batch = []
        if batch:
            yield {self.input_name: np.stack(batch)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None

    def chunks(self, images_per_chunk: int = 16) -> Iterator[CalibrationDataReader]:
        """Readers over consecutive slices of the batches (each a plain ORT reader)."""
        self.rewind()
        per_chunk = max(1, images_per_chunk // self.batch_size)
        while True:
            chunk = [b for b in (self.get_next() for _ in range(per_chunk)) if b is not None]
            if not chunk:
                return
            yield _ListReader(chunk)

    def arrays(self, limit: int | None = None) -> list[np.ndarray]:
        """The first `limit` batches as arrays (for sensitivity analysis)."""
        self.rewind()
        out = []
        while limit is None or len(out) < limit:
            batch = self.get_next()
            if batch is None:
                break
            out.append(batch[self.input_name])
        self.rewind()
        return out


class _ListReader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_reader(
    directory: Path | str,
    image_size: int,
    input_name: str = "images",
    num_images: int | None = None,
    batch_size: int = 1,
) -> ImageBatches:
    """The DVC calibration set (images/ + manifest.json, sha256-checked) as ORT calibration batches."""
    from ssdopt.data.calibration import read_calibration_images, read_manifest

    directory = Path(directory)
    total = len(read_manifest(directory)["images"])
    if num_images is not None and not 1 <= num_images <= total:
        raise SsdoptError(
            f"calibration num_images={num_images}", f"1..{total} (images in {directory})", "lower num_images"
        )

    def images() -> Iterator[np.ndarray]:
        for i, image in enumerate(read_calibration_images(directory, image_size)):
            if num_images is not None and i >= num_images:
                return
            yield image

    return ImageBatches(images, input_name, batch_size)


def array_reader(images: np.ndarray, input_name: str = "images", batch_size: int = 1) -> ImageBatches:
    """Calibration batches from an in-memory float32 [N, 3, H, W] array (tests, notebooks)."""
    images = np.asarray(images, dtype=np.float32)
    return ImageBatches(lambda: iter(images), input_name, batch_size)


def calibration_version(directory: Path | str, num_images: int | None = None) -> dict[str, Any]:
    """The calibration set's version: DVC's md5 from dvc.lock when recorded, and the manifest sha256.

    The manifest lists every image's sha256, so its own sha256 versions the content even when the
    set was not produced by `dvc repro` (tests, ad-hoc sets).
    """
    from ssdopt.data.calibration import read_manifest
    from ssdopt.dvcinfo import tracked_md5

    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest_bytes = (directory / "manifest.json").read_bytes()
    try:
        relative = directory.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        relative = directory
    return {
        "directory": str(directory),
        "dvc_md5": tracked_md5(relative),  # dvc.lock stage output, or a `dvc add`-ed folder
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "images_in_set": len(manifest["images"]),
        "images_used": num_images or len(manifest["images"]),
    }
