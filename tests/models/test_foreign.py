"""A user's own torchvision SSD checkpoint: a state dict (.pth) or plain safetensors, architecture and
class count read off the tensors, torchvision's COCO (full-tail) SSDlite layout included, nothing
downloaded, nothing unpickled."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torchvision.models import detection

from ssdopt.errors import SsdoptError
from ssdopt.models.foreign import _full_tail
from ssdopt.models.zoo import load_checkpoint

LITE = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch weights fails the test (CI has no network, and neither may users)."""

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def torchvision_model(name: str, num_classes: int, full_tail: bool = False) -> torch.nn.Module:
    """What a user trained: torchvision's builder (the full tail is what weights_backbone gives)."""
    torch.manual_seed(num_classes)
    with _full_tail() if full_tail else contextlib.nullcontext():
        return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes).eval()


def head_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.head(list(model.backbone(images).values()))


@pytest.mark.parametrize(
    ("name", "num_classes", "full_tail"),
    [(LITE, 5, False), (LITE, 91, True), (LITE, 5, True), ("ssd300_vgg16", 5, False)],
)
def test_state_dict_is_recognised_and_loads_exactly(name, num_classes, full_tail, tmp_path: Path) -> None:  # noqa: ANN001
    original = torchvision_model(name, num_classes, full_tail)
    path = tmp_path / "model.pth"
    torch.save(original.state_dict(), path)
    model, meta = load_checkpoint(path)
    assert (meta["model"], meta["num_classes"]) == (name, num_classes)
    if name == LITE:
        assert meta["pretrained_backbone"] is full_tail  # the layout, built without downloading
    assert meta["class_names"][0] == "__background__" and meta["class_names"][1] == "class_1"
    size = 320 if name == LITE else 300
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    want, got = head_outputs(original, images), head_outputs(model, images)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_training_script_containers_and_data_parallel_prefix(tmp_path: Path) -> None:
    original = torchvision_model(LITE, 3)
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "model": state, "optimizer": {}}, path)
    model, meta = load_checkpoint(path, class_names=["cat", "dog"])
    assert meta["class_names"] == ["__background__", "cat", "dog"] and meta["num_classes"] == 3
    images = torch.rand(1, 3, 320, 320)
    assert torch.equal(
        head_outputs(original, images)["cls_logits"], head_outputs(model, images)["cls_logits"]
    )


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_a_pickled_model_is_refused_with_the_conversion_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "whole.pth"
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(SsdoptError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert not marker.exists()
    assert "whole.pth" in message and "weights_only=True" in message and ".state_dict()" in message
    assert "\\x1b" not in message


@pytest.mark.parametrize(
    ("kwargs", "mention"),
    [
        ({"model": "ssd300_vgg16"}, "match none"),
        ({"num_classes": 9}, "they have 5"),
        ({"class_names": ["a", "b"]}, "4 class names"),
        ({"model": "yolo"}, "one of ssd300_vgg16"),
    ],
)
def test_what_the_tensors_contradict_is_refused(kwargs, mention, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "model.pth"
    torch.save(torchvision_model(LITE, 5).state_dict(), path)
    with pytest.raises(SsdoptError, match=mention):
        load_checkpoint(path, **kwargs)


def test_not_an_ssd(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(SsdoptError, match="torchvision SSD"):
        load_checkpoint(path)
