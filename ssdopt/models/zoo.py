"""torchvision SSD builders by name, and pickle-free safetensors checkpoints that remember how to rebuild.

A checkpoint is one `.safetensors` file: the model's state dict plus, in the header metadata under
the key `ssdopt`, a JSON object with at least `model` (builder name), `num_classes` (background
included), `class_names` and `image_size`. `load_checkpoint` rebuilds the architecture from that
metadata (never downloading anything) and loads the tensors; it never unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import detection, list_models
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from ssdopt.errors import SsdoptError

META_KEY = "ssdopt"
CHECKPOINT_FORMAT = "ssdopt-checkpoint-1"

# Post-processing of every model we build: the SSDDecodeNMS defaults of DESIGN.md, so torchvision's own
# `postprocess_detections` is the reference the fused op is tested against.
POSTPROCESS_DEFAULTS: dict[str, Any] = {
    "score_thresh": 0.01,
    "nms_thresh": 0.45,
    "detections_per_img": 200,
    "topk_candidates": 400,
}


def known_models() -> list[str]:
    """Names of the torchvision detection builders that return an SSD (their names start with `ssd`)."""
    return sorted(name for name in list_models(module=detection) if name.startswith("ssd"))


def build_model(
    name: str,
    num_classes: int,
    checkpoint: Path | str | None = None,
    *,
    pretrained: bool = False,
    **postprocess: Any,
) -> SSD:
    """Build a torchvision SSD by builder name with `num_classes` outputs (background included).

    Weights are random (weights=None, weights_backbone=None) unless `checkpoint` is given, whose
    weights are then loaded (its metadata must name the same model and class count). `pretrained=True`
    starts from torchvision's ImageNet backbone: it downloads, so it is for users with network only,
    never for tests or CI. `postprocess` overrides `POSTPROCESS_DEFAULTS` (score_thresh, nms_thresh,
    detections_per_img, topk_candidates).
    """
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, expected_num_classes=num_classes)
        if meta["model"] != name:
            raise SsdoptError(
                checkpoint,
                f"a checkpoint of model '{name}', but it holds '{meta['model']}'",
                f"pass --model {meta['model']} or a checkpoint trained for {name}",
            )
        _set_postprocess(model, {**POSTPROCESS_DEFAULTS, **postprocess})
        return model
    return _build(name, num_classes, pretrained_backbone=pretrained, postprocess=postprocess)


def _build(name: str, num_classes: int, *, pretrained_backbone: bool, postprocess: dict[str, Any]) -> SSD:
    """Call the torchvision builder; weights only with `pretrained_backbone` (downloads)."""
    names = known_models()
    if name not in names:
        raise SsdoptError(
            f"model name '{name}'",
            f"one of the torchvision SSD builders: {', '.join(names)}",
            "pick one of those",
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise SsdoptError(
            f"num_classes={num_classes!r}",
            "an integer >= 2 (object classes + 1 background)",
            "count the dataset's classes and add one",
        )
    builder = getattr(detection, name)
    kwargs = {**POSTPROCESS_DEFAULTS, **postprocess}
    weights_backbone = "DEFAULT" if pretrained_backbone else None
    model = builder(weights=None, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs)
    model.ssdopt_pretrained_backbone = pretrained_backbone
    return model


def _set_postprocess(model: SSD, postprocess: dict[str, Any]) -> None:
    """Set the attributes `postprocess_detections` reads (checkpoints do not store them)."""
    for key, value in postprocess.items():
        if key not in POSTPROCESS_DEFAULTS:
            raise SsdoptError(
                f"post-processing option '{key}'", f"one of {sorted(POSTPROCESS_DEFAULTS)}", "fix the name"
            )
        setattr(model, key, value)


def model_image_size(model: SSD) -> int:
    """Square input side the model's transform resizes to (320 for ssdlite320, 300 for ssd300)."""
    fixed = getattr(model.transform, "fixed_size", None)
    if fixed:
        return int(fixed[0])
    return int(model.transform.min_size[0])


def num_classes_of(model: SSD) -> int:
    """Classes (background included) the classification head predicts."""
    return int(model.head.classification_head.num_columns)


def anchors_for(model: torch.nn.Module, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's default boxes for one image_size x image_size input: [A, 4] x1y1x2y2 pixels."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dummy = torch.zeros((1, 3, image_size, image_size), device=device)
        features = list(model.backbone(dummy).values())
        anchors = model.anchor_generator(ImageList(dummy, [(image_size, image_size)]), features)[0]
    model.train(was_training)
    return anchors


def save_checkpoint(model: nn.Module, path: Path | str, meta: dict[str, Any]) -> Path:
    """Write the state dict and `meta` (JSON-serialisable) to one safetensors file, atomically.

    Required keys in `meta`: model, num_classes, class_names; image_size is filled from the model if absent.
    Refuses to save NaN/Inf weights (a diverged training run must not become a checkpoint).
    """
    from safetensors.torch import save_file

    path = Path(path)
    missing = [key for key in ("model", "num_classes", "class_names") if key not in meta]
    if missing:
        raise SsdoptError("checkpoint metadata", f"the keys {missing}", "pass them in meta")
    full_meta = {"image_size": model_image_size(model), **meta}
    full_meta.setdefault("pretrained_backbone", bool(getattr(model, "ssdopt_pretrained_backbone", False)))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _check_finite(tensors, path, "fix the training run (lower the learning rate) and save again")
    header = {META_KEY: json.dumps(full_meta, sort_keys=True), "format": CHECKPOINT_FORMAT}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The `ssdopt` metadata of a checkpoint, read from the safetensors header only."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise SsdoptError(
            path,
            f"a readable safetensors checkpoint ({exc})",
            "re-download it, or retrain with `ssdopt train`",
        ) from exc
    return _parse_meta(path, header)


def is_ssdopt_checkpoint(path: Path) -> bool:
    """A .safetensors file carrying ssdopt's metadata (anything else is a user's own checkpoint)."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return META_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - damaged: read_checkpoint_meta reports it with the fix
        return True


def load_checkpoint(
    path: Path | str,
    *,
    expected_num_classes: int | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[SSD, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights (never unpickling, never downloading).

    An ssdopt checkpoint (safetensors + metadata) names its model and classes. A user's own torchvision
    state dict (.pth/.pt, or plain safetensors) is recognised from its tensors (ssdopt.models.foreign);
    `model`, `num_classes` and `class_names` then pin or name what the tensors cannot say.
    Returns (model in eval mode on CPU, metadata). Every failure is an SsdoptError naming the file:
    missing, corrupt, unknown model name, class count different from `expected_num_classes` or from
    the metadata, keys that do not fit the architecture, NaN/Inf weights.
    """
    from safetensors.torch import load_file

    path = _existing(path)
    if not is_ssdopt_checkpoint(path):
        from ssdopt.models.foreign import load_foreign_checkpoint

        built, meta = load_foreign_checkpoint(
            path, model=model, num_classes=num_classes, class_names=class_names
        )
        _check_expected_classes(path, meta, expected_num_classes)
        return built, meta
    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise SsdoptError(
            path,
            f"a readable safetensors checkpoint ({exc})",
            "re-download it, or retrain with `ssdopt train`",
        ) from exc
    _check_finite(tensors, path, "retrain or restore the checkpoint; a diverged run cannot be used")
    # A checkpoint started from torchvision's ImageNet backbone has that backbone's layout (ssdlite: the
    # full tail): built with random weights, which the checkpoint's replace (nothing is downloaded).
    from ssdopt.models.foreign import build_layout

    full_tail = bool(meta.get("pretrained_backbone", False))
    model = build_layout(meta["model"], int(meta["num_classes"]), full_tail, {})
    weights_classes = _num_classes_in(tensors, model)
    if weights_classes is not None and weights_classes != int(meta["num_classes"]):
        raise SsdoptError(
            path,
            f"weights for {meta['num_classes']} classes as its metadata says, "
            f"but they have {weights_classes}",
            "the file is inconsistent: retrain or restore it",
        )
    _check_expected_classes(path, meta, expected_num_classes)
    model_keys = set(model.state_dict())
    missing, unexpected = sorted(model_keys - set(tensors)), sorted(set(tensors) - model_keys)
    if missing or unexpected:
        raise SsdoptError(
            path,
            f"the state dict of {meta['model']} (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "pass the model the checkpoint was trained as, or retrain",
        )
    shapes = model.state_dict()
    wrong = [k for k, v in tensors.items() if tuple(v.shape) != tuple(shapes[k].shape)]
    if wrong:
        raise SsdoptError(
            path,
            f"tensor shapes of {meta['model']} (first mismatch {wrong[0]}: "
            f"{tuple(tensors[wrong[0]].shape)} vs {tuple(shapes[wrong[0]].shape)})",
            "pass the model the checkpoint was trained as, or retrain",
        )
    model.load_state_dict(tensors)
    model.eval()
    return model, meta


def _check_expected_classes(path: Path, meta: dict[str, Any], expected_num_classes: int | None) -> None:
    if expected_num_classes is not None and int(meta["num_classes"]) != expected_num_classes:
        raise SsdoptError(
            path,
            f"a checkpoint with {expected_num_classes} classes (background included), "
            f"but the checkpoint has {meta['num_classes']} classes",
            "use the checkpoint trained on this dataset, or retrain with `ssdopt train`",
        )


def _existing(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SsdoptError(
            path,
            "an existing checkpoint (.safetensors, or a torchvision state dict .pth)",
            "check the path (params.yaml model.checkpoint), or train one with `ssdopt train`",
        )
    return path


def _parse_meta(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if META_KEY not in header:
        raise SsdoptError(
            path,
            f"an ssdopt checkpoint (safetensors metadata key '{META_KEY}')",
            "save checkpoints with ssdopt.models.zoo.save_checkpoint",
        )
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise SsdoptError(
            path, f"JSON in the '{META_KEY}' metadata ({exc})", "retrain or restore it"
        ) from exc
    missing = [key for key in ("model", "num_classes", "class_names") if key not in meta]
    if missing:
        raise SsdoptError(
            path, f"checkpoint metadata with {missing}", "save with ssdopt.models.zoo.save_checkpoint"
        )
    return meta


def _check_finite(tensors: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SsdoptError(path, f"finite weights, but {len(bad)} tensors hold NaN/Inf (first: {bad[0]})", fix)


def _num_classes_in(tensors: dict[str, torch.Tensor], model: SSD) -> int | None:
    """Class count implied by the checkpoint's last classification conv (outputs = anchors x classes)."""
    reference = model.state_dict()
    expected = num_classes_of(model)
    for key, value in reference.items():
        if (
            key.startswith("head.classification_head.module_list.")
            and key.endswith("weight")
            and value.dim() == 4
            and value.shape[1] != 1  # skip the depthwise conv of ssdlite's head
            and key in tensors
        ):
            per_location = value.shape[0] // expected
            if per_location and tensors[key].shape[0] % per_location == 0:
                return int(tensors[key].shape[0] // per_location)
    return None


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars."""
    return int(sum(p.numel() for p in model.parameters()))


__all__ = [
    "POSTPROCESS_DEFAULTS",
    "anchors_for",
    "build_model",
    "count_parameters",
    "known_models",
    "load_checkpoint",
    "model_image_size",
    "num_classes_of",
    "read_checkpoint_meta",
    "save_checkpoint",
]
