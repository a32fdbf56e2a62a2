"""The one image preprocessing shared by training, calibration and inference.

Every consumer turns a file into the same float32 [3, H, W] RGB tensor in [0, 1], so a model
sees identical pixels whether it is trained, calibrated or served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssdopt.errors import SsdoptError

_EXPECTED = "a readable image (JPEG/PNG)"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and 32-bit integer grey are scaled from 0..65535."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.size and float(grey.max()) <= 1.0 else 1.0
        grey8 = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    # L, LA, 1, P (with or without transparency), RGBA, CMYK, YCbCr, ...: PIL knows the way.
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb8(path: Path) -> Image.Image:
    """Decode a file fully into an 8-bit RGB PIL image; any decode failure is an SsdoptError."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb8(opened)
    except FileNotFoundError as exc:
        raise SsdoptError(
            path, _EXPECTED, "the file does not exist; check the path or regenerate the data"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SsdoptError(
            path, _EXPECTED, f"the file cannot be decoded ({exc}); replace it or regenerate the data"
        ) from exc


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Read an image file as float32 [3, H, W] RGB in [0, 1].

    Grayscale, RGBA, palette and 16-bit files become 8-bit-range RGB first (alpha is dropped).
    With `size`, the image is resized (PIL bilinear, antialiased when shrinking) to [3, size, size]
    unless it already has that shape. EXIF orientation is not applied (COCO boxes refer to raw pixels).
    """
    if size is not None and (not isinstance(size, (int, np.integer)) or size <= 0):
        raise SsdoptError("size", f"a positive integer image side, got {size!r}", "pass e.g. size=320")
    image = load_rgb8(path)
    if size is not None and image.size != (size, size):
        image = image.resize((int(size), int(size)), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
