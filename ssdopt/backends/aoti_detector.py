"""The detector as one exportable graph, and the checkpoint it comes from.

SsdWithDecodeNms wraps a torchvision SSD: normalisation + backbone + head + anchors (a buffer) +
`torch.ops.ssdopt.decode_nms`, so the whole detector, post-processing included, is one graph for
torch.export / AOTInductor / torch.compile. Only torch-aoti uses it (ssdopt.backends.torch_aoti).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

INPUT_NAME = "images"
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
NAME = "torch-aoti"


# ----------------------------------------------------------------------------------------------
# Which checkpoint an ONNX came from


def resolve_checkpoint(onnx: Path | str | None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"path", "sha256", "found_via"} of the checkpoint this engine is built from (module docstring)."""
    provenance = provenance or {}
    candidates: list[tuple[Any, str, Path]] = []
    if provenance.get("checkpoint"):
        candidates.append((provenance["checkpoint"], "provenance", Path.cwd()))
    if onnx is not None and Path(onnx).suffix == ".safetensors":
        candidates.append((str(onnx), "argument", Path.cwd()))
    dirs = [Path(provenance["source_dir"])] if provenance.get("source_dir") else []
    if onnx is not None:
        dirs.append(Path(onnx).parent)
    for directory in dirs:
        record = directory / "export.json"
        if record.is_file():
            try:
                entry = json.loads(record.read_text()).get("checkpoint")
            except json.JSONDecodeError as exc:
                raise SsdoptError(record, f"valid JSON ({exc})", "re-export the model") from exc
            if entry:
                candidates.append((entry, str(record), record.parent))
    if not candidates:
        raise SsdoptError(
            onnx or "torch-aoti source",
            "the PyTorch checkpoint the engine is built from: a .safetensors path, provenance['checkpoint'], "
            "or a 'checkpoint' field in export.json beside the ONNX",
            "export with `ssdopt export` (it records the checkpoint) or pass the checkpoint path",
        )
    entry, found_via, base = candidates[0]
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    path = Path(entry["path"] if isinstance(entry, dict) else entry)
    if not path.is_absolute() and not path.is_file() and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise SsdoptError(
            path,
            f"the checkpoint named by {found_via}",
            "restore it (dvc pull) or retrain with `ssdopt train`",
        )
    digest = sha256_file(path)
    if recorded and recorded != digest:
        raise SsdoptError(
            path,
            f"sha256 {recorded[:16]}... as recorded in {found_via}, found {digest[:16]}...",
            "the checkpoint changed after the export: re-export the ONNX, or restore the checkpoint",
        )
    return {"path": str(path), "sha256": digest, "found_via": found_via}


# ----------------------------------------------------------------------------------------------
# The detector as one graph


def decode_attributes(model: Any, image_size: int) -> dict[str, Any]:
    """SSDDecodeNMS attributes equal to torchvision SSD.postprocess_detections of `model`."""
    return {
        "score_threshold": float(model.score_thresh),
        "iou_threshold": float(model.nms_thresh),
        "pre_nms_top_k": int(model.topk_candidates),
        "max_detections": int(model.detections_per_img),
        "box_weights": [float(w) for w in model.box_coder.weights],
        "softmax": True,
        "background_class": 0,
        "class_agnostic": False,
        "image_height": int(image_size),
        "image_width": int(image_size),
    }


def _model_anchors(model: Any, image_size: int) -> Any:
    """anchors float32 [A, 4] (x1, y1, x2, y2 pixels) of one image of the model's input size."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    images = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        features = model.backbone(images)
        features = list(features.values()) if isinstance(features, dict) else [features]
        return model.anchor_generator(ImageList(images, [(image_size, image_size)]), features)[0].float()


def _detector_class() -> type:
    import torch
    from torch import nn

    class SsdWithDecodeNms(nn.Module):
        """A torchvision SSD as one graph: images float32 [B, 3, S, S] in [0, 1] (RGB) ->
        (num_detections int32 [B], boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K]).

        Normalisation, anchors and thresholds are the model's own; backbone and head run in `dtype`,
        normalisation and anchors stay float32; decode_nms gets fp32 or fp16 head outputs (its kernels'
        input types; bf16 is widened to fp32 first).
        """

        def __init__(self, model: Any, image_size: int, dtype: Any = torch.float32) -> None:
            super().__init__()
            self.backbone = copy.deepcopy(model.backbone).to(dtype)
            self.head = copy.deepcopy(model.head).to(dtype)
            self.compute_dtype = dtype
            self.register_buffer(
                "mean", torch.tensor(model.transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            )
            self.register_buffer(
                "std", torch.tensor(model.transform.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            )
            self.register_buffer("anchors", _model_anchors(model, image_size))
            self.image_size = int(image_size)
            self.attributes = decode_attributes(model, image_size)

        def head_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """box_deltas [B, A, 4], class_logits [B, A, C] in the compute dtype."""
            x = ((images - self.mean) / self.std).to(self.compute_dtype)
            features = self.backbone(x)
            features = list(features.values()) if isinstance(features, dict) else [features]
            out = self.head(features)
            return out["bbox_regression"], out["cls_logits"]

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            deltas, logits = self.head_outputs(images)
            if deltas.dtype not in (torch.float32, torch.float16):
                deltas, logits = deltas.float(), logits.float()
            a = self.attributes
            return torch.ops.ssdopt.decode_nms(
                deltas,
                logits,
                self.anchors,
                a["score_threshold"],
                a["iou_threshold"],
                a["pre_nms_top_k"],
                a["max_detections"],
                a["box_weights"],
                a["softmax"],
                a["background_class"],
                a["class_agnostic"],
                a["image_height"],
                a["image_width"],
            )

    return SsdWithDecodeNms


def detector_module(model: Any, precision: str = "fp32", image_size: int | None = None) -> Any:
    """SsdWithDecodeNms of a torchvision SSD (eval mode, CPU); `model` itself is not changed."""
    import torch

    from ssdopt.models.zoo import model_image_size
    from ssdopt.ops.library import load_torch_ops

    if precision not in TORCH_DTYPES:
        raise SsdoptError(f"--precision {precision} for {NAME}", "fp32, fp16 or bf16", "pick one of those")
    load_torch_ops()  # forward calls torch.ops.ssdopt.decode_nms
    size = int(image_size or model_image_size(model))
    return _detector_class()(model.eval(), size, getattr(torch, TORCH_DTYPES[precision])).eval()


def weights_sha256(model: Any) -> str:
    """sha256 over the state dict (name, dtype, shape, bytes): the weights of an in-memory model."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_detector(detector: Any, device: str, max_batch: int) -> Any:
    """torch.export of the detector on `device` with batch dimension 1..max_batch (static when 1)."""
    import torch

    size = detector.image_size
    example_batch = 2 if max_batch >= 2 else 1
    example = torch.rand(example_batch, 3, size, size, device=device)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch >= 2 else None
    with torch.no_grad():
        return torch.export.export(detector.to(device), (example,), dynamic_shapes=dynamic)


def inductor_configs(max_autotune: bool, threads: int | None = None) -> dict[str, Any]:
    """Freezing always (weights as constants: Conv+BN folding); max-autotune on request.

    threads: the OpenMP thread count compiled into the CPU kernels (`#pragma omp parallel
    num_threads(N)`; default: torch.get_num_threads() at build time).
    """
    configs: dict[str, Any] = {"freezing": True}
    if max_autotune:
        configs["max_autotune"] = True
    if threads:
        configs["cpp.threads"] = int(threads)
    return configs


def compile_package(program: Any, path: Path, max_autotune: bool, threads: int | None = None) -> Path:
    """AOTInductor: ExportedProgram -> .pt2 package at `path` (freezing needs grad disabled)."""
    import torch

    with torch.no_grad():
        out = torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=inductor_configs(max_autotune, threads)
        )
    return Path(out)


# The GPU fallback's recipe for large batches (benchmarks/gpu_floor.py, H200, torch 2.11, ssdlite320 fp16,
# one run; RESULTS.md): 1x1 convolutions as matmuls, channels-last forced, cuDNN picking its algorithms by
# timing them: 29,273 img/s at batch 256 against 23,803 for the batch-1 recipe, but 0.555 against 0.534 ms
# at batch 1. So batches from `large_batch_from` on get it; smaller ones keep the engine's own.
LARGE_BATCH_CONFIGS: dict[str, Any] = {"conv_1x1_as_mm": True, "force_layout_optimization": True}


def compile_program(
    program_path: Path,
    max_autotune: bool = False,
    threads: int | None = None,
    large_batch: dict[str, Any] | None = None,
) -> Any:
    """The GPU fallback: torch.compile (Inductor, freezing, no internal CUDA graphs) of the saved program.

    large_batch: the engine's recorded recipe ({"from_batch", "inductor_configs", "cudnn_benchmark"}):
    batches of from_batch and more run a second compile of the program with those configs (one loaded
    module each, so their caches stay apart)."""
    import torch

    from ssdopt.ops.library import load_torch_ops

    load_torch_ops()
    options = {**inductor_configs(max_autotune, threads), "triton.cudagraphs": False}
    small = torch.compile(
        torch.export.load(str(program_path)).module(), fullgraph=True, dynamic=False, options=options
    )
    large, from_batch = None, 0
    if large_batch and int(large_batch.get("from_batch") or 0) > 0:
        from_batch = int(large_batch["from_batch"])
        large = torch.compile(
            torch.export.load(str(program_path)).module(),
            fullgraph=True,
            dynamic=False,
            options={**options, **large_batch.get("inductor_configs", {})},
        )
    cudnn_benchmark = bool((large_batch or {}).get("cudnn_benchmark"))

    def forward(images: Any) -> Any:
        with torch.no_grad():
            if large is None or images.shape[0] < from_batch:
                return small(images)
            benchmark = torch.backends.cudnn.benchmark
            # cuDNN times its algorithms in the runner's warm-up, before the CUDA graph is captured
            torch.backends.cudnn.benchmark = cudnn_benchmark or benchmark
            try:
                return large(images)
            finally:
                torch.backends.cudnn.benchmark = benchmark

    return forward
