"""torch -> ONNX export of a torchvision SSD's backbone + head, with anchors and a parity check.

The exported graph is what every backend builds from: input `images` float32 [B, 3, H, W] RGB in [0, 1]
(already resized to H x W; the model's mean/std normalisation is folded into the graph), outputs
`box_deltas` [B, A, 4] and `class_logits` [B, A, C], concatenated over feature levels exactly as
torchvision's SSD head does before `postprocess_detections`. Decoding and NMS stay outside (the
SSDDecodeNMS op is appended later). The output directory holds:

    model.onnx           one file, BatchNorm folded into the convolutions by the exporter's optimiser
    model_unfolded.onnx  the same network with its BatchNormalization nodes kept (for the fusion report)
    anchors.npy          float32 [A, 4] x1y1x2y2 pixels: the model's default boxes for H x W
    export.json          model, classes, shapes, opset, normalisation, post-processing defaults, sha256s

export.json holds nothing this machine measured: it is a DVC output, and the parity check's max abs
difference moves with the CPU's float kernels (AVX2 vs AVX-512), which would change its md5 and leave
dvc.lock modified after a fresh clone's `make run`. It records the tolerance that was met; the measured
differences go to the log.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ssdopt.data import atomic_output_dir
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.models.zoo import anchors_for, load_checkpoint, model_image_size, num_classes_of

MARKER = "export.json"
INPUT_NAME = "images"
OUTPUT_NAMES = ("box_deltas", "class_logits")
PARITY_BATCHES = (2, 3)  # the second batch size proves the batch dimension is dynamic

_log = logging.getLogger(__name__)


class SSDBackboneHead(nn.Module):
    """images float32 [B, 3, H, W] RGB in [0, 1] -> (box_deltas [B, A, 4], class_logits [B, A, C]).

    Normalises with the SSD's own transform mean/std, then runs its backbone and head: the same numbers
    torchvision feeds `postprocess_detections` for an input already of size H x W.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.register_buffer(
            "pixel_mean", torch.tensor(model.transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "pixel_std", torch.tensor(model.transform.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.pixel_mean) / self.pixel_std
        features = list(self.backbone(x).values())
        out = self.head(features)
        return out["bbox_regression"], out["cls_logits"]


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_source_paths(model) -> None:  # noqa: ANN001 - an onnx_ir.Model
    """Remove the exporter's per-node Python stack traces: they name this checkout's absolute paths, so
    the same checkpoint exported from two clones gave two different files (and a modified dvc.lock)."""
    graphs = [model.graph, *(function for function in model.functions.values())]
    for graph in graphs:
        for node in graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def _export_both(wrapper: nn.Module, example: torch.Tensor, folded: Path, unfolded: Path, opset: int) -> None:
    """One dynamo export (dynamic batch) saved twice as self-contained files: first as exported (BatchNorm
    nodes kept), then after the exporter's own optimiser (what `optimize=True` runs: constant folding,
    which folds BatchNorm into the convolutions)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}},
            optimize=False,
            external_data=False,
            verbose=False,
        )
        _drop_source_paths(program.model)
        program.save(str(unfolded), external_data=False)
        program.optimize()
        _drop_source_paths(program.model)
        program.save(str(folded), external_data=False)
    except Exception as exc:
        raise SsdoptError(
            folded.name,
            f"a successful dynamo ONNX export at opset {opset} ({type(exc).__name__}: {str(exc)[:300]})",
            "check the torch/onnxscript versions (pyproject pins) or report the model",
        ) from exc


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node))


def _check_onnx(path: Path, opset: int) -> int:
    """onnx.checker full check; returns the default-domain opset of the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise SsdoptError(path.name, f"a valid ONNX model ({exc})", "report the exporter failure") from exc
    model = onnx.load(str(path), load_external_data=False)
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < opset:
        raise SsdoptError(path.name, f"opset >= {opset}, got {version}", "upgrade torch/onnxscript")
    return int(version)


def ort_max_abs_diff(path: Path, wrapper: nn.Module, image_size: int, seed: int = 0) -> float:
    """Largest |ONNX Runtime CPU - torch| over both outputs, random [0, 1] images at batch sizes 2 and 3."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in PARITY_BATCHES:
        images = torch.rand(batch, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images)]
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
        for e, g in zip(expected, got, strict=True):
            if e.shape != g.shape:
                raise SsdoptError(path.name, f"output shape {e.shape} like torch, got {g.shape}", "report it")
            worst = max(worst, float(np.abs(e - g).max()))
    return worst


def export_onnx(
    model: nn.Module,
    out_dir: Path,
    image_size: int | None = None,
    opset: int = 18,
    meta: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
) -> Path:
    """Export `model` (a torchvision SSD) into `out_dir` atomically; returns out_dir.

    image_size: square input side (default: the size the model's transform resizes to). Raises
    SsdoptError, leaving no output, if the export, the ONNX full check or the ORT CPU parity
    (max abs difference <= tolerance, both files) fails.
    """
    if opset < 18:
        raise SsdoptError(
            f"opset={opset}", "18 or newer (the dynamo exporter emits >= 18)", "pass --opset 18"
        )
    out_dir = Path(out_dir)
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    image_size = int(image_size or model_image_size(model))
    wrapper = SSDBackboneHead(model).eval()
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    anchors = anchors_for(model, image_size, torch.device("cpu")).to(torch.float32).numpy()
    with torch.no_grad():
        deltas, logits = wrapper(example)
    if deltas.shape[1] != anchors.shape[0]:
        raise SsdoptError(
            "anchors", f"{deltas.shape[1]} anchors like the head, got {anchors.shape[0]}", "report it"
        )

    with atomic_output_dir(out_dir, MARKER) as tmp:
        files = {"model": tmp / "model.onnx", "unfolded": tmp / "model_unfolded.onnx"}
        _export_both(wrapper, example, files["model"], files["unfolded"], opset)
        np.save(tmp / "anchors.npy", anchors)
        versions, parity, ops = {}, {}, {}
        for key, path in files.items():
            versions[key] = _check_onnx(path, opset)
            parity[key] = ort_max_abs_diff(path, wrapper, image_size)
            ops[key] = _op_counts(path)
            if not parity[key] <= tolerance:
                raise SsdoptError(
                    path.name,
                    f"ONNX Runtime CPU outputs within {tolerance:g} of torch, "
                    f"max abs difference {parity[key]:.3g}",
                    "report it; a larger --tolerance only hides the problem",
                )
        if ops["unfolded"].get("BatchNormalization", 0) == 0 and _has_batchnorm(model):
            raise SsdoptError(
                files["unfolded"].name, "BatchNormalization nodes kept", "check optimize=False export"
            )
        _log.info("ONNX Runtime CPU vs torch, max abs difference: %s", parity)
        checked = {
            "reference": "torch CPU",
            "runtime": "onnxruntime CPU",
            "tolerance": tolerance,
            "within_tolerance": sorted(parity),
        }
        info = _export_info(model, wrapper, image_size, anchors, versions["model"], checked, ops, meta or {})
        info["files"] = {p.name: sha256_file(p) for p in [*files.values(), tmp / "anchors.npy"]}
        (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; publish with the usual permissions
    return out_dir


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _export_info(
    model: nn.Module,
    wrapper: SSDBackboneHead,
    image_size: int,
    anchors: np.ndarray,
    opset: int,
    parity: dict[str, Any],
    ops: dict[str, dict[str, int]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    num_classes = num_classes_of(model)
    class_names = meta.get("class_names") or ["__background__"] + [
        f"class_{i}" for i in range(1, num_classes)
    ]
    return {
        "model": meta.get("model", type(model).__name__),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "num_anchors": int(anchors.shape[0]),
        "image_size": image_size,
        "opset": opset,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, image_size, image_size],
            "dtype": "float32",
            "range": "RGB in [0, 1], resized to image_size x image_size",
        },
        "outputs": {
            "box_deltas": ["batch", int(anchors.shape[0]), 4],
            "class_logits": ["batch", int(anchors.shape[0]), num_classes],
        },
        "normalisation": {
            "mean": [float(v) for v in model.transform.image_mean],
            "std": [float(v) for v in model.transform.image_std],
            "folded_into_graph": True,
        },
        "anchors": {"file": "anchors.npy", "format": "x1y1x2y2 pixels", "shape": list(anchors.shape)},
        "box_coder_weights": [float(w) for w in model.box_coder.weights],
        "postprocess": {
            "score_threshold": float(model.score_thresh),
            "iou_threshold": float(model.nms_thresh),
            "pre_nms_top_k": int(model.topk_candidates),
            "max_detections": int(model.detections_per_img),
            "score_activation": "softmax",
            "background_class": 0,
        },
        "parity": parity,
        "op_counts": ops,
        "checkpoint": meta.get("checkpoint"),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    image_size: int | None = None,
    opset: int = 18,
    tolerance: float = 1e-4,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Load a checkpoint (ssdopt safetensors, or a torchvision state dict; never unpickled) and
    `export_onnx` it; returns out_dir. `model_name`, `num_classes`, `class_names`: for a user's own
    state dict, which does not record them (see ssdopt.models.foreign)."""
    model, meta = load_checkpoint(
        checkpoint, model=model_name, num_classes=num_classes, class_names=class_names
    )
    info = {
        "model": meta["model"],
        "class_names": meta["class_names"],
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(Path(checkpoint))},
    }
    out = export_onnx(model, out_dir, image_size=image_size, opset=opset, meta=info, tolerance=tolerance)
    write_decode_nms_variant(out)
    return out


NMS_VARIANT = "model_nms.onnx"


def write_decode_nms_variant(export_dir: Path) -> Path:
    """`model_nms.onnx` beside the export: the same graph ending in the fused SSDDecodeNMS node
    (attributes from export.json), so every runtime runs decode + NMS as one graph node."""
    from ssdopt.ops.onnx_node import add_decode_nms_node

    export_dir = Path(export_dir)
    info = json.loads((export_dir / "export.json").read_text())
    post, size = info["postprocess"], int(info["image_size"])
    graph = add_decode_nms_node(
        onnx.load(str(export_dir / "model.onnx")),
        np.load(export_dir / "anchors.npy"),
        score_threshold=float(post["score_threshold"]),
        iou_threshold=float(post["iou_threshold"]),
        pre_nms_top_k=int(post["pre_nms_top_k"]),
        max_detections=int(post["max_detections"]),
        box_weights=tuple(info["box_coder_weights"]),
        softmax=post.get("score_activation", "softmax") == "softmax",
        background_class=int(post.get("background_class", 0)),
        image_height=size,
        image_width=size,
    )
    onnx.checker.check_model(graph)
    target = export_dir / NMS_VARIANT
    tmp = target.with_name(f".{NMS_VARIANT}.tmp")
    try:
        onnx.save(graph, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
