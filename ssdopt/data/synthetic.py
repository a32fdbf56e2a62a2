"""Synthetic shapes detection dataset in COCO format, deterministic by seed.

Each image: a crop of one of scikit-image's bundled photographs (flipped, recoloured), clutter
that belongs to no class (lines, scribbles, irregular blobs), 1-8 objects of 10 classes that
differ in form (rotated, aspect-jittered, random colour and texture, sometimes outlined, partly
occluding each other), then lighting changes, blur and noise. Every image is seeded from
(seed, split, index), so the bytes do not depend on the number of worker processes.
"""

from __future__ import annotations

import colorsys
import hashlib
import importlib.resources
import json
import math
import multiprocessing
import os
import re
import sys
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ssdopt.data import atomic_output_dir
from ssdopt.data.coco import write_coco
from ssdopt.errors import SsdoptError

GENERATOR_VERSION = "1"
CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "arrow",
    "heart",
    "crescent",
)
DEFAULT_SPLITS = {"train": 6000, "val": 1000, "test": 1000}
MARKER = "dataset.json"

# Backgrounds: photographs shipped inside the scikit-image wheel (no pooch download). coins.png is
# left out on purpose: its coins look like the "circle" and "ring" classes.
BACKGROUND_FILES: tuple[str, ...] = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "motorcycle_left.png",
    "camera.png",
    "moon.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "page.png",
    "clock_motion.png",
)

# Object size = longest side of the tight box, in pixels at 320 x 320 (scaled with image_size).
# SSDlite320's smallest anchors are ~64 px, so tiny objects are kept to a minority.
SMALL_FRACTION = 0.15
SMALL_RANGE = (8.0, 20.0)
MAIN_RANGE = (20.0, 150.0)
MAX_OBJECTS = 8
MIN_VISIBLE = 0.4  # drop an annotation when more than 60% of the shape is hidden
MAX_BOX_OVERLAP = 0.7  # a new object may cover at most this fraction of an earlier object's box
SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered: smooth edges
BOX_ALPHA = 64  # a pixel at least 25% covered by the shape lies inside its box
JPEG_QUALITY = 95
CHUNK = 25  # images per worker task


# --------------------------------------------------------------------------- shapes
def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0, -math.pi / 2)
    inner = _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 16.0


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ],
        dtype=np.float64,
    )


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62), (0.1, 0.22), (-1, 0.22)])


def _crescent(offset: float = 0.5, inner: float = 0.9) -> np.ndarray:
    """Unit circle minus a circle of radius `inner` centred at (offset, 0), as one polygon."""
    x = (1 - inner**2 + offset**2) / (2 * offset)  # where the two circles cross
    y = math.sqrt(1 - x * x)
    outer_from = math.atan2(y, x)
    outer_arc = np.linspace(outer_from, 2 * math.pi - outer_from, 40)
    inner_from = math.atan2(-y, x - offset) % (2 * math.pi)
    inner_to = math.atan2(y, x - offset)
    inner_arc = np.linspace(inner_from, inner_to, 32)
    return np.concatenate(
        [
            np.stack([np.cos(outer_arc), np.sin(outer_arc)], axis=1),
            np.stack([offset + inner * np.cos(inner_arc), inner * np.sin(inner_arc)], axis=1),
        ]
    )


@cache
def shape_polygons(name: str) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Canonical shape of a class: (filled outer polygon [N, 2], hole polygons), centred, extent ~2."""
    circle = _regular(48)
    shapes = {
        "circle": (circle, ()),
        "square": (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64), ()),
        "triangle": (_regular(3, 1.0, -math.pi / 2), ()),
        "star": (_star(), ()),
        "cross": (_cross(), ()),
        "ring": (circle, (_regular(48, 0.55),)),
        "hexagon": (_regular(6), ()),
        "arrow": (_arrow(), ()),
        "heart": (_heart(), ()),
        "crescent": (_crescent(), ()),
    }
    return shapes[name]


# --------------------------------------------------------------------------- backgrounds
_BACKGROUNDS: list[Image.Image] | None = None  # decoded once per process


def _backgrounds() -> list[Image.Image]:
    """The bundled scikit-image photographs as RGB PIL images, decoded once per process."""
    global _BACKGROUNDS
    if _BACKGROUNDS is None:
        root = importlib.resources.files("skimage.data")
        images = []
        for name in BACKGROUND_FILES:
            resource = root / name
            try:
                with resource.open("rb") as stream, Image.open(stream) as image:
                    images.append(image.convert("RGB"))
            except (FileNotFoundError, OSError) as exc:
                raise SsdoptError(
                    f"skimage/data/{name}",
                    "a background photo bundled with scikit-image",
                    "reinstall scikit-image (pip install --force-reinstall scikit-image)",
                ) from exc
        _BACKGROUNDS = images
    return _BACKGROUNDS


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random square crop of a bundled photo, resized to size x size, flipped and recoloured."""
    photo = _backgrounds()[int(rng.integers(len(BACKGROUND_FILES)))]
    width, height = photo.size
    side = rng.uniform(0.25, 1.0) * min(width, height)
    x0 = rng.uniform(0, width - side)
    y0 = rng.uniform(0, height - side)
    image = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.2:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < 0.4:
        bands = image.split()
        image = Image.merge("RGB", [bands[int(i)] for i in rng.permutation(3)])
    if rng.random() < 0.2:  # desaturate, then tint
        image = image.convert("L").convert("RGB")
    gain = rng.uniform(0.75, 1.25, size=3)
    return image.point(_channel_lut(lambda v, c: v * gain[c]))


def _channel_lut(curve) -> list[int]:
    """A PIL point() table (3 x 256 entries) of `curve(levels in 0..1, channel)`, clipped to 0..255."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    table = [np.clip(np.rint(curve(levels, c) * 255.0), 0, 255) for c in range(3)]
    return np.concatenate(table).astype(np.int64).tolist()


# --------------------------------------------------------------------------- clutter
def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _clutter(rng: np.random.Generator, size: int) -> tuple[str, list[tuple[float, float]], int]:
    """One distractor that belongs to no class: ("line" | "polygon", points, line width)."""
    kind = rng.random()
    scale = size / 320.0
    if kind < 0.35:  # straight line
        points = rng.uniform(-20, size + 20, size=(2, 2))
        return "line", [tuple(p) for p in points.tolist()], int(rng.integers(1, 5))
    if kind < 0.6:  # scribble: a random polyline
        start = rng.uniform(0, size, size=2)
        steps = rng.normal(0, 18 * scale, size=(int(rng.integers(3, 8)), 2))
        points = np.concatenate([start[None], start + np.cumsum(steps, axis=0)])
        return "line", [tuple(p) for p in points.tolist()], int(rng.integers(1, 4))
    n = int(rng.integers(5, 10))  # irregular blob: random radii at random angles
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
    radius = rng.uniform(4, 28) * scale * rng.uniform(0.3, 1.0, size=n)
    centre = rng.uniform(0, size, size=2)
    points = centre + np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    return "polygon", [tuple(p) for p in points.tolist()], 0


def _draw_clutter(draw: ImageDraw.ImageDraw, item: tuple[str, list, int], fill) -> None:
    kind, points, width = item
    if kind == "line":
        draw.line(points, fill=fill, width=width, joint="curve")
    else:
        draw.polygon(points, fill=fill)


# --------------------------------------------------------------------------- objects
def _object_size(rng: np.random.Generator, size: int) -> float:
    scale = size / 320.0
    if rng.random() < SMALL_FRACTION:
        return rng.uniform(*SMALL_RANGE) * scale
    low, high = MAIN_RANGE
    return math.exp(rng.uniform(math.log(low), math.log(high))) * scale


def _place(shape: tuple[np.ndarray, tuple[np.ndarray, ...]], rng: np.random.Generator, side: float):
    """Rotate and aspect-jitter a canonical shape, scale its extent to `side`: polygons at origin."""
    outer, holes = shape
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.array([aspect, 1.0])
    outer_t = (outer * stretch) @ rotation.T
    extent = outer_t.max(axis=0) - outer_t.min(axis=0)
    factor = side / float(extent.max())
    centre = (outer_t.max(axis=0) + outer_t.min(axis=0)) / 2
    placed_outer = (outer_t - centre) * factor
    placed_holes = tuple((((h * stretch) @ rotation.T) - centre) * factor for h in holes)
    return placed_outer, placed_holes


def _rasterise(
    outer: np.ndarray, holes: tuple[np.ndarray, ...], outline: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Anti-aliased alpha [h, w] uint8 of polygons given in patch pixels (and an outline alpha)."""
    s = SUPERSAMPLE
    width = int(math.ceil(outer[:, 0].max())) + 1
    height = int(math.ceil(outer[:, 1].max())) + 1
    big = (width * s, height * s)
    mask = Image.new("L", big, 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([tuple(p) for p in (outer * s).tolist()], fill=255)
    for hole in holes:
        draw.polygon([tuple(p) for p in (hole * s).tolist()], fill=0)
    alpha = np.asarray(mask.resize((width, height), Image.Resampling.BOX))
    if outline <= 0:
        return alpha, None
    line = Image.new("L", big, 0)
    ImageDraw.Draw(line).polygon([tuple(p) for p in (outer * s).tolist()], outline=255, width=outline * s)
    edge = np.asarray(line.resize((width, height), Image.Resampling.BOX))
    return alpha, np.minimum(edge, alpha)


def _texture(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """Object fill [h, w, 3] float32: solid, a gradient to a second colour, stripes or speckle."""
    kind = rng.random()
    base = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    if kind < 0.5:
        return base
    second = np.asarray(_random_colour(rng), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    if kind < 0.75:
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
        return base + (second - base) * ramp[:, :, None] * np.float32(rng.uniform(0.3, 0.8))
    if kind < 0.87:
        period = rng.uniform(4, 12)
        stripes = (np.floor(ramp / period) % 2)[:, :, None].astype(np.float32)
        return base * (1 - stripes) + second * stripes
    speckle = rng.normal(0, rng.uniform(10, 30), size=(height, width, 1)).astype(np.float32)
    return base + speckle


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A random colour, resampled (a few times) while too close to the mean colour behind it."""
    mean = behind.reshape(-1, 3).mean(axis=0) if behind.size else np.zeros(3, np.float32)
    colour = np.asarray(_random_colour(rng), dtype=np.float32)
    for _ in range(4):
        if float(np.abs(colour - mean).sum()) > 90:
            break
        colour = np.asarray(_random_colour(rng), dtype=np.float32)
    return colour


def _overlaps_too_much(
    box: tuple[float, float, float, float], placed: list[tuple[float, float, float, float]]
) -> bool:
    x0, y0, x1, y1 = box
    for px0, py0, px1, py1 in placed:
        iw = min(x1, px1) - max(x0, px0)
        ih = min(y1, py1) - max(y0, py0)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter > MAX_BOX_OVERLAP * (px1 - px0) * (py1 - py0):
            return True
    return False


# --------------------------------------------------------------------------- photometry
def _photometric(rng: np.random.Generator, image: Image.Image) -> np.ndarray:
    """Blur, lighting (contrast, gain, colour cast, gamma, illumination ramp) and noise: uint8 HxWx3.

    The pointwise part is one lookup table per channel, so it costs nearly nothing.
    """
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.8))))
    mean = float(np.asarray(image).mean()) / 255.0
    contrast = rng.uniform(0.6, 1.3)
    gain = rng.uniform(0.65, 1.3)
    cast = rng.uniform(0.85, 1.15, size=3) if rng.random() < 0.2 else np.ones(3)
    gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.45)))

    def curve(v: np.ndarray, c: int) -> np.ndarray:
        return np.clip(((v - mean) * contrast + mean) * gain * cast[c], 0.0, 1.0) ** gamma

    image = image.point(_channel_lut(curve))
    ramp_on, noise_on = rng.random() < 0.3, rng.random() < 0.5
    if not (ramp_on or noise_on):
        return np.asarray(image, dtype=np.uint8).copy()
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    if ramp_on:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(angle)) + np.arange(
            height, dtype=np.float32
        )[:, None] * np.float32(math.sin(angle))
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        low, high = sorted(rng.uniform(0.55, 1.25, size=2))
        pixels *= (np.float32(low) + np.float32(high - low) * ramp)[:, :, None]
    if noise_on:
        sigma = np.float32(rng.uniform(2.0, 10.0))
        pixels += rng.standard_normal(size=pixels.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- one image
def _draw_object(
    canvas: np.ndarray,
    owner: np.ndarray,
    rng: np.random.Generator,
    side: float,
    placed: list[tuple[float, float, float, float]],
    number: int,
) -> dict | None:
    """Draw one random object of longest side `side` onto canvas [H, W, 3] float32, in place.

    Pixels the object covers (alpha >= 50%) get `number` in owner [H, W] (occlusion bookkeeping).
    Returns {"category_id", "bbox" (tight, clipped, integer pixels), "full_area"} or None when no
    free spot was found or nothing landed inside the image.
    """
    size = canvas.shape[0]
    category = int(rng.integers(len(CLASSES)))
    outer, holes = _place(shape_polygons(CLASSES[category]), rng, side)
    half_w = float(outer[:, 0].max() - outer[:, 0].min()) / 2
    half_h = float(outer[:, 1].max() - outer[:, 1].min()) / 2
    for _ in range(10):
        cx = rng.uniform(0.4 * half_w, size - 0.4 * half_w)
        cy = rng.uniform(0.4 * half_h, size - 0.4 * half_h)
        box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
        if not _overlaps_too_much(box, placed):
            break
    else:
        return None
    placed.append(box)
    ox, oy = math.floor(box[0]), math.floor(box[1])  # patch origin, in image pixels
    local = np.array([cx - ox, cy - oy])
    outline = int(rng.integers(1, max(2, int(side / 18)) + 1)) if rng.random() < 0.3 else 0
    alpha, edge = _rasterise(outer + local, tuple(h + local for h in holes), outline)
    full_area = int((alpha >= 128).sum())  # counts pixels outside the image too
    ph, pw = alpha.shape
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + pw, size), min(oy + ph, size)
    if full_area == 0 or x1 <= x0 or y1 <= y0:
        return None
    crop = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
    a = alpha[crop]
    region = canvas[y0:y1, x0:x1]
    colour = _contrasting_colour(rng, region[a >= 128])
    fill = _texture(rng, colour, y1 - y0, x1 - x0)
    weight = (a.astype(np.float32) / np.float32(255.0))[:, :, None]
    region[:] = region * (1 - weight) + fill * weight
    if edge is not None:
        dark = rng.random() < 0.5
        edge_colour = colour * np.float32(0.35) if dark else np.asarray(_random_colour(rng), np.float32)
        e = (edge[crop].astype(np.float32) / np.float32(255.0))[:, :, None]
        region[:] = region * (1 - e) + edge_colour * e
    inside = a >= 128  # pixels the object owns (for occlusion)
    drawn = a >= BOX_ALPHA  # pixels that bound its box
    if not inside.any():
        return None
    owner[y0:y1, x0:x1][inside] = number
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    bbox = [int(x0 + cols[0]), int(y0 + rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {"category_id": category + 1, "bbox": bbox, "full_area": full_area}


def generate_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """One synthetic image and its boxes.

    Returns the image uint8 [H, W, 3] RGB (H = W = image_size) and annotations
    [{"bbox": [x, y, w, h], "category_id": 1..len(CLASSES)}], boxes tight around the drawn shape
    (integers, clipped to the image); objects more than 60% hidden are drawn but not annotated.
    """
    size = int(image_size)
    background = _background(rng, size)
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(2, 9))):
        _draw_clutter(draw, _clutter(rng, size), _random_colour(rng))
    canvas = np.array(background, dtype=np.float32)
    owner = np.full((size, size), -1, dtype=np.int16)  # -1 background, -2 clutter, k object k

    count = int(rng.integers(1, MAX_OBJECTS + 1))
    sides = sorted((_object_size(rng, size) for _ in range(count)), reverse=True)  # big ones first
    placed: list[tuple[float, float, float, float]] = []
    objects: list[dict] = []
    for side in sides:
        drawn = _draw_object(canvas, owner, rng, side, placed, number=len(objects))
        if drawn is not None:
            objects.append(drawn)

    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    # clutter on top of the objects occludes them too
    over_count = int(rng.integers(0, 4))
    if over_count:
        cover = Image.new("L", (size, size), 0)
        draw_image, draw_cover = ImageDraw.Draw(image), ImageDraw.Draw(cover)
        for _ in range(over_count):
            item = _clutter(rng, size)
            _draw_clutter(draw_image, item, _random_colour(rng))
            _draw_clutter(draw_cover, item, 255)
        owner[np.asarray(cover) > 0] = -2

    visible = np.bincount(owner.ravel().astype(np.int64) + 2, minlength=len(objects) + 2)[2:]
    annotations = [
        {"bbox": obj["bbox"], "category_id": obj["category_id"]}
        for obj, seen in zip(objects, visible, strict=True)
        if seen >= MIN_VISIBLE * obj["full_area"]
    ]
    return _photometric(rng, image), annotations


# --------------------------------------------------------------------------- the dataset
def _split_code(split: str) -> int:
    """A stable integer for a split name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: depends on nothing else."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _split_code(split), int(index)]))


def file_name(index: int) -> str:
    """File name of image `index` (0-based); its COCO image id is index + 1."""
    return f"{index + 1:06d}.jpg"


def _render_chunk(task: tuple[int, str, list[int], int, str]) -> list[tuple[int, list[dict]]]:
    """Worker: generate, encode and write a run of images; return their annotations."""
    seed, split, indices, image_size, split_dir = task
    results = []
    for index in indices:
        pixels, annotations = generate_image(image_rng(seed, split, index), image_size)
        Image.fromarray(pixels).save(Path(split_dir) / file_name(index), "JPEG", quality=JPEG_QUALITY)
        results.append((index, annotations))
    return results


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def _coco_split(split: str, seed: int, image_size: int, per_image: list[list[dict]]) -> dict:
    images, annotations = [], []
    for index, boxes in enumerate(per_image):
        images.append(
            {"id": index + 1, "file_name": file_name(index), "width": image_size, "height": image_size}
        )
        for box in boxes:
            x, y, w, h = (float(v) for v in box["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": box["category_id"],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": "ssdopt synthetic shapes",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }


def _check_arguments(seed: int, image_size: int, splits: dict[str, int], workers: int | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SsdoptError("seed", f"a non-negative integer, got {seed!r}", "pass e.g. --seed 0")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 64:
        raise SsdoptError("image_size", f"an integer >= 64, got {image_size!r}", "pass e.g. --image-size 320")
    if not splits:
        raise SsdoptError("splits", "at least one split with images", "pass e.g. {'train': 6000}")
    for name, count in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or name == "dataset":
            raise SsdoptError(
                f"split '{name}'", "a name of letters, digits, _ or - (not 'dataset')", "rename it"
            )
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise SsdoptError(
                f"split '{name}'", f"an image count >= 1, got {count!r}", "pass a positive count"
            )
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise SsdoptError(
            "workers", f"a positive number of processes, got {workers!r}", "pass e.g. --workers 2"
        )


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def generate_dataset(
    out: Path,
    seed: int,
    image_size: int = 320,
    splits: dict[str, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write out/<split>/NNNNNN.jpg, out/<split>.json (COCO) and out/dataset.json; returns `out`.

    Atomic: everything is written into a temp dir beside `out` that then replaces it. Same seed
    and counts give the same bytes whatever `workers` is (default: one process per core).
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    _check_arguments(seed, image_size, splits, workers)
    seed, image_size = int(seed), int(image_size)
    _backgrounds()  # fail early, in this process, if a bundled photo is missing
    workers = workers or _default_workers()
    total = sum(splits.values())

    from tqdm import tqdm

    with atomic_output_dir(Path(out), MARKER) as tmp:
        tasks = []
        for split, count in splits.items():
            (tmp / split).mkdir()
            for start in range(0, count, CHUNK):
                tasks.append(
                    (seed, split, list(range(start, min(start + CHUNK, count))), image_size, str(tmp / split))
                )
        per_split: dict[str, list[list[dict] | None]] = {
            split: [None] * count for split, count in splits.items()
        }
        bar = tqdm(total=total, desc="generating images", unit="img", file=sys.stderr, disable=not progress)
        try:
            if workers == 1 or len(tasks) == 1:
                results = map(_render_chunk, tasks)
                for task, chunk in zip(tasks, results, strict=True):
                    _collect(per_split[task[1]], chunk, bar)
            else:
                with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
                    for task, chunk in zip(tasks, pool.imap(_render_chunk, tasks), strict=True):
                        _collect(per_split[task[1]], chunk, bar)
        finally:
            bar.close()

        summary = {}
        for split, per_image in per_split.items():
            coco = _coco_split(split, seed, image_size, per_image)  # type: ignore[arg-type]
            write_coco(coco, tmp / f"{split}.json")
            counts = np.bincount([a["category_id"] - 1 for a in coco["annotations"]], minlength=len(CLASSES))
            summary[split] = {
                "images": len(coco["images"]),
                "annotations": len(coco["annotations"]),
                "instances_per_class": {name: int(c) for name, c in zip(CLASSES, counts, strict=True)},
            }
        manifest = {
            "generator": "ssdopt.data.synthetic",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": image_size,
            "classes": list(CLASSES),
            "backgrounds": [f"skimage/data/{name}" for name in BACKGROUND_FILES],
            "object_sizes": {
                "small_fraction": SMALL_FRACTION,
                "small_range_px": list(SMALL_RANGE),
                "main_range_px_log_uniform": list(MAIN_RANGE),
                "at_image_size": 320,
                "max_objects": MAX_OBJECTS,
                "min_visible_fraction": MIN_VISIBLE,
            },
            "splits": summary,
        }
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out)


def _collect(slots: list, chunk: list[tuple[int, list[dict]]], bar) -> None:
    for index, boxes in chunk:
        slots[index] = boxes
    bar.update(len(chunk))
