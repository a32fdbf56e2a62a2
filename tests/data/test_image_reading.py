"""read_image: every pixel format becomes float32 [3, H, W] RGB in [0, 1]; bad files fail clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import skimage.transform
from PIL import Image

from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "coco_small"))
from make_fixture import PALETTE, pixels  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "coco_small" / "instances"


def test_rgb_png_matches_an_independent_decoder() -> None:
    got = read_image(IMAGES / "rgb.png")
    reference = (
        skimage.io.imread(IMAGES / "rgb.png").astype(np.float32) / 255.0
    )  # imageio, not PIL's path here
    assert got.dtype == np.float32 and got.shape == (3, 6, 8)
    np.testing.assert_array_equal(got, reference.transpose(2, 0, 1))
    np.testing.assert_array_equal(got * 255, pixels()["rgb"].transpose(2, 0, 1))


def test_grey_becomes_three_equal_channels() -> None:
    got = read_image(IMAGES / "grey.png")
    expected = pixels()["grey"].astype(np.float32) / 255.0
    assert got.shape == (3, 6, 8)
    for channel in got:
        np.testing.assert_array_equal(channel, expected)


def test_rgba_drops_alpha() -> None:
    got = read_image(IMAGES / "rgba.png")
    np.testing.assert_array_equal(got * 255, pixels()["rgb"].transpose(2, 0, 1))


def test_palette_is_expanded_through_its_palette() -> None:
    got = np.rint(read_image(IMAGES / "palette.png") * 255).astype(int)
    colours = np.array(PALETTE).reshape(-1, 3)
    expected = colours[pixels()["palette_index"]].transpose(2, 0, 1)
    np.testing.assert_array_equal(got, expected)


def test_sixteen_bit_grey_is_scaled_to_eight_bit_range() -> None:
    got = read_image(IMAGES / "grey16.png")
    expected = np.rint(pixels()["grey16"] / 65535.0 * 255.0) / 255.0
    assert got.shape == (3, 6, 8) and got.max() <= 1.0
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    np.testing.assert_array_equal(got[0], got[2])


def test_jpeg_cmyk_and_la_are_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb[:, :, 0]).convert("LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "cmyk.jpg").shape == (3, 12, 10)
    la = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(la[1] * 255, rgb[:, :, 0])


def test_resize_keeps_orientation_and_matches_skimage(tmp_path: Path) -> None:
    height, width = 40, 90
    ramp = np.tile(np.linspace(0, 255, width), (height, 1))
    picture = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 128)], axis=2).round().astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "wide.png")
    got = read_image(tmp_path / "wide.png", size=64)
    assert got.shape == (3, 64, 64)
    assert np.all(np.diff(got[0].mean(axis=0)) > 0)  # red still grows from left to right
    assert np.all(np.diff(got[1].mean(axis=0)) < 0)
    np.testing.assert_allclose(got[2], 128 / 255, atol=1e-6)
    reference = skimage.transform.resize(picture / 255.0, (64, 64), order=1, anti_aliasing=True)
    assert np.abs(got - reference.transpose(2, 0, 1)).mean() < 0.02


def test_same_size_is_not_resampled() -> None:
    np.testing.assert_array_equal(read_image(IMAGES / "rgb.png"), read_image(IMAGES / "rgb.png", size=None))
    square = read_image(IMAGES / "rgb.png", size=8)
    assert square.shape == (3, 8, 8)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image at all", None],
    ids=["empty", "text", "truncated-jpeg"],
)
def test_corrupt_file_names_the_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.jpg"
    if content is None:
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(SsdoptError) as error:
        read_image(path)
    assert str(path) in str(error.value) and "readable image" in str(error.value)


def test_missing_file_and_bad_size(tmp_path: Path) -> None:
    with pytest.raises(SsdoptError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(SsdoptError, match="size"):
        read_image(IMAGES / "rgb.png", size=0)
