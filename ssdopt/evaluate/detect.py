"""`ssdopt detect`: run an engine on image files; an annotated PNG and a JSON of detections per image.

Pre-processing is the training one (`read_image(path, size)`: RGB float32 [3, S, S] in [0, 1]);
boxes are scaled back to the original image size; class names come from the engine's export.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageDraw

from ssdopt.backends.base import Engine, get_backend
from ssdopt.data.images import load_rgb8, read_image
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.engine import as_detections, engine_classes, engine_input_size
from ssdopt.fileio import atomic_write, write_json

REGISTRY_PREFIX = "models:/"
PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
)


def resolve_engine(engine: str | Path) -> Path:
    """An engine directory, or a registry URI models:/NAME@ALIAS resolved by ssdopt.tracking."""
    text = str(engine)
    if text.startswith(REGISTRY_PREFIX):
        from ssdopt import tracking

        resolver = getattr(tracking, "resolve_engine_uri", None)
        if resolver is None:
            raise SsdoptError(
                text,
                "an engine directory (this build's ssdopt.tracking cannot resolve registry URIs)",
                "pass the engine directory, e.g. artifacts/engines/onnxruntime-int8-<key>",
            )
        return Path(resolver(text))
    return Path(text)


def class_names(engine: Engine) -> list[str]:
    """Names by label (0 = background) from the export.json copied into the engine directory."""
    return engine_classes(engine)[0] or []


def detections_of(dets: Any, index: int, scale: np.ndarray, names: list[str], min_score: float) -> list[dict]:
    """One image's detections as JSON-ready dicts, boxes x1y1x2y2 in original pixels."""
    out = []
    for i in range(int(dets.num_detections[index])):
        score, label = float(dets.scores[index, i]), int(dets.labels[index, i])
        if score < min_score or label < 0:
            continue
        box = (np.asarray(dets.boxes[index, i], dtype=np.float64) * scale).tolist()
        name = names[label] if 0 <= label < len(names) else f"class_{label}"
        out.append(
            {
                "box_xyxy": [round(v, 2) for v in box],
                "score": round(score, 5),
                "label": label,
                "class_name": name,
            }
        )
    return out


def draw(path: Path, detections: list[dict], out: Path) -> Path:
    """The original image with boxes and `name score` captions, as PNG (atomic)."""
    image = load_rgb8(path)
    canvas = ImageDraw.Draw(image)
    for det in detections:
        colour = PALETTE[det["label"] % len(PALETTE)]
        x1, y1, x2, y2 = det["box_xyxy"]
        canvas.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        canvas.text((x1 + 2, max(0.0, y1 - 11)), f"{det['class_name']} {det['score']:.2f}", fill=colour)
    return atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_files(paths: list[Path]) -> list[Path]:
    """The image files of `paths`: files as given, folders expanded to their images (sorted, not
    recursive, by suffix)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise SsdoptError(
                    path, f"a folder holding images ({', '.join(IMAGE_SUFFIXES)})", "pass another folder"
                )
            found += inside
        else:
            found.append(path)
    return found


def detect_images(
    engine: str | Path,
    images: list[Path],
    out_dir: Path,
    min_score: float = 0.3,
    batch_size: int = 8,
) -> list[tuple[Path, Path]]:
    """(annotated PNG, detections JSON) per image under `out_dir`, named after the image's stem.
    `images`: files and folders of images; the engine runs `batch_size` images at a time."""
    if not images:
        raise SsdoptError("IMAGES", "at least one image file or folder", "pass image paths after the options")
    if not 0.0 <= min_score <= 1.0:  # NaN compares False too
        raise SsdoptError(f"--min-score {min_score}", "a score in [0, 1]", "pass e.g. --min-score 0.3")
    if isinstance(batch_size, bool) or batch_size < 1:
        raise SsdoptError(f"--batch-size {batch_size}", "a positive batch size", "pass e.g. --batch-size 8")
    images = image_files(images)
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):
        raise SsdoptError(
            "IMAGES",
            "images with distinct file stems (outputs are named after them)",
            "rename or detect them in separate runs",
        )
    loaded = Engine.open(resolve_engine(engine))
    height, width = engine_input_size(loaded)
    if height != width:
        raise SsdoptError(loaded.path, "a square-input engine", "rebuild from a square export")
    names = class_names(loaded)
    # Decode every image before writing anything: a corrupt file fails the run with no outputs. Only
    # the sizes are kept; pixels are read again batch by batch (a folder may hold thousands).
    sizes = [load_rgb8(path).size for path in images]  # (W, H)
    runner = get_backend(loaded.backend).load(loaded.path)
    written = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.stack([read_image(path, size=height) for path in chunk])
            dets = as_detections(runner.infer(batch), loaded, height, width)
            for index, path in enumerate(chunk):
                original = sizes[start + index]
                scale = np.array([original[0] / width, original[1] / height] * 2)
                found = detections_of(dets, index, scale, names, min_score)
                record = {
                    "image": str(path),
                    "engine": str(loaded.path),
                    "width": original[0],
                    "height": original[1],
                    "min_score": min_score,
                    "detections": found,
                }
                written.append(
                    (
                        draw(path, found, out_dir / f"{path.stem}.png"),
                        write_json(record, out_dir / f"{path.stem}.json"),
                    )
                )
    finally:
        runner.close()
    return written
