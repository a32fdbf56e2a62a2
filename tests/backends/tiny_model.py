"""A tiny SSD-shaped detector exported like ssdopt.export does, and a tiny calibration set.

The network has the pieces that matter to engines: Conv -> BatchNorm -> ReLU6/Hardswish blocks
(fusion), two feature maps with box and class heads, permute/reshape/concat tails, a dynamic batch.
Exported with torch.onnx.export(dynamo=True) twice: folded (model.onnx) and unfolded
(model_unfolded.onnx, BatchNormalization kept). Exports are cached across sessions by source hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
NUM_CLASSES = 4  # background included
ANCHORS_PER_CELL = 3
FEATURE_SIZES = (16, 8)


@dataclass(frozen=True)
class TinyExport:
    directory: Path
    model: Path
    unfolded: Path
    anchors: Path
    image_size: int = IMAGE_SIZE
    num_classes: int = NUM_CLASSES


def _network():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int, stride: int, act: nn.Module) -> nn.Sequential:
                return nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act
                )

            self.stem = nn.Sequential(block(3, 8, 2, nn.ReLU6()), block(8, 16, 2, nn.Hardswish()))
            self.down = block(16, 32, 2, nn.ReLU6())
            a, c = ANCHORS_PER_CELL, NUM_CLASSES
            self.box = nn.ModuleList([nn.Conv2d(16, a * 4, 3, padding=1), nn.Conv2d(32, a * 4, 3, padding=1)])
            self.cls = nn.ModuleList([nn.Conv2d(16, a * c, 3, padding=1), nn.Conv2d(32, a * c, 3, padding=1)])

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f1 = self.stem(images)
            f2 = self.down(f1)
            batch = images.shape[0]

            def flat(t: torch.Tensor, k: int) -> torch.Tensor:
                return t.permute(0, 2, 3, 1).reshape(batch, -1, k)

            boxes = torch.cat([flat(h(f), 4) for h, f in zip(self.box, (f1, f2), strict=True)], 1)
            logits = torch.cat([flat(h(f), NUM_CLASSES) for h, f in zip(self.cls, (f1, f2), strict=True)], 1)
            return boxes, logits

    torch.manual_seed(0)
    net = Tiny().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding matters numerically
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net


def anchors() -> np.ndarray:
    """float32 [A, 4] (x1, y1, x2, y2) in pixels, in the heads' (y, x, anchor) order."""
    out = []
    for size in FEATURE_SIZES:
        step = IMAGE_SIZE / size
        for y in range(size):
            for x in range(size):
                cx, cy = (x + 0.5) * step, (y + 0.5) * step
                for scale in (1.0, 2.0, 3.0):
                    half = scale * step / 2
                    out.append((cx - half, cy - half, cx + half, cy + half))
    return np.asarray(out, dtype=np.float32)


def export_tiny(directory: Path) -> TinyExport:
    """Export model.onnx, model_unfolded.onnx and anchors.npy into `directory` (if not there yet)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    result = TinyExport(
        directory, directory / "model.onnx", directory / "model_unfolded.onnx", directory / "anchors.npy"
    )
    if result.model.is_file() and result.unfolded.is_file() and result.anchors.is_file():
        return result
    net = _network()
    example = (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE),)
    batch = torch.export.Dim("batch", min=1, max=64)
    for optimize, path in ((True, result.model), (False, result.unfolded)):
        program = torch.onnx.export(
            net,
            example,
            dynamo=True,
            input_names=["images"],
            output_names=["box_deltas", "class_logits"],
            dynamic_shapes={"images": {0: batch}},
            optimize=optimize,
            opset_version=18,
            verbose=False,
        )
        program.save(str(path))
    np.save(result.anchors, anchors())
    (directory / "export.json").write_text(json.dumps({"model": "tiny", "image_size": IMAGE_SIZE}))
    return result


def cached_export(config) -> TinyExport:
    """The export, cached in pytest's cache dir under a key of this file + torch version."""
    return export_tiny(Path(config.cache.mkdir(f"ssdopt-tiny-export-{source_hash()}")))


def torch_reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exported network itself, run by torch: (box_deltas, class_logits) for float32 images."""
    import torch

    with torch.no_grad():
        boxes, logits = _network()(torch.from_numpy(images))
    return boxes.numpy(), logits.numpy()


def source_hash() -> str:
    import torch

    return hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:16]


def make_calibration_set(directory: Path, count: int = 12, seed: int = 0) -> Path:
    """images/*.jpg (shapes on noise, IMAGE_SIZE square) + manifest.json as ssdopt.data writes it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        pixels = (rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 80).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.integers(0, IMAGE_SIZE - 16, size=2)
            w, h = rng.integers(8, 24, size=2)
            draw.rectangle(
                (int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
            )
        name = f"{i:04d}.jpg"
        image.save(directory / "images" / name, quality=95)
        digest = hashlib.sha256((directory / "images" / name).read_bytes()).hexdigest()
        entries.append({"file_name": name, "image_id": i, "sha256": digest})
    manifest = {"strategy": "random", "seed": seed, "num_images": count, "images": entries}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def fresh_images(count: int = 4, seed: int = 1) -> np.ndarray:
    """Fresh float32 [count, 3, S, S] inputs in [0, 1] (not the calibration images)."""
    return np.random.default_rng(seed).random((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


DECODE_ATTRIBUTES = {"score_threshold": 0.05, "max_detections": 20, "pre_nms_top_k": 50}


def with_decode_nms(model_path: Path, out: Path) -> Path:
    """The export plus an ssdopt::SSDDecodeNMS node (DESIGN.md attributes; anchors an initializer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    k = DECODE_ATTRIBUTES["max_detections"]
    graph.initializer.append(numpy_helper.from_array(anchors(), "anchors"))
    graph.node.append(
        helper.make_node(
            "SSDDecodeNMS",
            ["box_deltas", "class_logits", "anchors"],
            ["num_detections", "boxes", "scores", "labels"],
            name="decode_nms",
            domain="ssdopt",
            score_threshold=DECODE_ATTRIBUTES["score_threshold"],
            iou_threshold=0.45,
            pre_nms_top_k=DECODE_ATTRIBUTES["pre_nms_top_k"],
            max_detections=k,
            box_weights=[10.0, 10.0, 5.0, 5.0],
            score_activation="softmax",
            background_class=0,
            class_agnostic=0,
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
        )
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("labels", TensorProto.INT32, ["batch", k]),
        ]
    )
    model.opset_import.append(helper.make_opsetid("ssdopt", 1))
    onnx.save(model, str(out))
    return out
