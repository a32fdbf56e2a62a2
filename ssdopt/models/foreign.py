"""Checkpoints as users have them: a torchvision SSD `state_dict` (.pth/.pt, read with
`torch.load(weights_only=True)` only) or plain safetensors, without ssdopt's metadata.

The architecture is recognised from the tensors themselves: each torchvision SSD builder (and, for
SSDlite, both backbone layouts: the reduced tail torchvision builds without ImageNet weights and the
full tail of its COCO / ImageNet-backbone checkpoints) is built with random weights and compared key
by key and shape by shape; the class count comes from the classification head. Nothing is ever
downloaded: the full-tail layout is built with `weights_backbone=None`.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection.ssd import SSD

from ssdopt.errors import SsdoptError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net")  # training scripts' usual containers
BACKGROUND = "__background__"
# (builder, full_tail): the layouts tried, most common first. full_tail only changes SSDlite.
LAYOUTS: tuple[tuple[str, bool], ...] = (
    ("ssdlite320_mobilenet_v3_large", True),
    ("ssdlite320_mobilenet_v3_large", False),
    ("ssd300_vgg16", False),
)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`: safetensors, or a torch.save'd dict of tensors (weights_only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise SsdoptError(
                path, f"a readable safetensors checkpoint ({exc})", "re-download or re-save it"
            ) from exc
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise SsdoptError(
            path,
            f"a checkpoint file ending in .safetensors or {', '.join(STATE_DICT_SUFFIXES)}",
            "save the model's state_dict with torch.save(model.state_dict(), 'model.pth')",
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[
            :160
        ]
        raise SsdoptError(
            path,
            "a state dict of tensors, which torch.load(weights_only=True) reads, or a safetensors file "
            f"({first}); a pickled model object is code that would run on load, so it is never unpickled",
            'convert it once, where you trust the file: python -c "import torch; '
            f"torch.save(torch.load('{path}', weights_only=False).state_dict(), '{path.stem}_state.pth')\"",
        ) from None
    return _unwrap(loaded, path)


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, also inside {"model": ...}-style containers and DataParallel's
    "module." prefix."""
    for key in WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded:
        raise SsdoptError(path, "a state dict (a mapping of names to tensors)", "save model.state_dict()")
    tensors = {str(k).removeprefix("module."): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SsdoptError(path, "a state dict with tensors", "save model.state_dict()")
    return tensors


@contextlib.contextmanager
def _full_tail() -> Iterator[None]:
    """torchvision builds SSDlite's MobileNetV3 with a reduced tail unless it downloads ImageNet
    weights; its COCO and ImageNet-backbone checkpoints have the full tail. Build that layout with
    random weights instead (the checkpoint's tensors replace them), so nothing is downloaded."""
    from torchvision.models.detection import ssdlite

    real = ssdlite.mobilenet_v3_large

    @functools.wraps(real)
    def full(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **{**kwargs, "reduced_tail": False})

    ssdlite.mobilenet_v3_large = full
    try:
        yield
    finally:
        ssdlite.mobilenet_v3_large = real


def build_layout(name: str, num_classes: int, full_tail: bool, postprocess: dict[str, Any]) -> SSD:
    """A torchvision SSD of builder `name` with random weights (weights=None, weights_backbone=None)."""
    from ssdopt.models.zoo import _build

    context = _full_tail() if full_tail and name.startswith("ssdlite") else contextlib.nullcontext()
    with context:
        model = _build(name, num_classes, pretrained_backbone=False, postprocess=postprocess)
    model.ssdopt_pretrained_backbone = bool(full_tail)  # the layout, for the saved metadata
    return model


def _structure(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of everything but the class-count-dependent classification head."""
    return {
        k: tuple(v.shape)
        for k, v in state.items()
        if not k.startswith("head.classification_head.") and not k.endswith("num_batches_tracked")
    }


def infer_architecture(
    tensors: Mapping[str, torch.Tensor], path: Path, model: str | None = None
) -> tuple[str, bool, int]:
    """(builder name, full_tail, num_classes with background) of a torchvision SSD state dict."""
    from ssdopt.models.zoo import _num_classes_in, known_models

    if model is not None and model not in known_models():
        raise SsdoptError(f"--model {model}", f"one of {', '.join(known_models())}", "pick one of those")
    wanted = _structure(tensors)
    tried = []
    for name, full_tail in LAYOUTS:
        if model is not None and name != model:
            continue
        candidate = build_layout(name, 2, full_tail, {})
        if _structure(candidate.state_dict()) == wanted:
            classes = _num_classes_in(dict(tensors), candidate)
            if classes is None or classes < 2:
                break
            return name, full_tail, classes
        tried.append(
            f"{name} ({'full' if full_tail else 'reduced'} backbone tail)" if "lite" in name else name
        )
    raise SsdoptError(
        path,
        f"the state dict of a torchvision SSD ({', '.join(tried) or model}); its tensors match none",
        "pass a checkpoint of one of those architectures (`--model` picks one), or retrain with "
        "`ssdopt train`",
    )


def resolve_class_names(num_classes: int, class_names: Sequence[str] | None, source: str) -> list[str]:
    """Names by label, 0 = background: given names (with or without a background entry first) or
    class_1..class_N. The count must fit the classification head."""
    if class_names is None:
        return [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes - 1:
        names = [BACKGROUND, *names]
    if len(names) != num_classes:
        raise SsdoptError(
            source,
            f"{num_classes - 1} class names for a head of {num_classes - 1} classes + background, "
            f"got {len(class_names)}",
            "pass the dataset the model was trained on (--dataset) or the right --class-names",
        )
    return names


def load_foreign_checkpoint(
    path: Path,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[SSD, dict[str, Any]]:
    """(model in eval mode on CPU, ssdopt metadata) of a torchvision state dict or plain safetensors."""
    from ssdopt.models.zoo import _check_finite, model_image_size

    tensors = read_tensors(path)
    _check_finite(tensors, path, "retrain or restore the checkpoint; a diverged run cannot be used")
    name, full_tail, classes = infer_architecture(tensors, path, model)
    if num_classes is not None and num_classes != classes:
        raise SsdoptError(
            path,
            f"weights for {num_classes} classes (--num-classes, background included); they have {classes}",
            "drop --num-classes, or pass the checkpoint trained for that many classes",
        )
    names = resolve_class_names(classes, class_names, str(path))
    built = build_layout(name, classes, full_tail, {})
    missing = sorted(set(built.state_dict()) - set(tensors))
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise SsdoptError(
            path, f"every tensor of {name} (missing {missing[:3]})", "pass a complete state dict"
        )
    built.load_state_dict(tensors, strict=False)
    built.eval()
    meta = {
        "model": name,
        "num_classes": classes,
        "class_names": names,
        "image_size": model_image_size(built),
        "pretrained_backbone": full_tail,  # the layout; nothing was downloaded
        "source_format": "safetensors state dict" if path.suffix == ".safetensors" else "torch state dict",
    }
    return built, meta
