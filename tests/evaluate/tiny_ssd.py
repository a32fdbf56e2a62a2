"""A tiny torchvision SSD (64x64 input, two feature maps) for bench/detect/report tests.

Its classification head is scaled up so random weights still give confident, spatially varying
detections: agreement between engines then means something.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import onnx
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

IMAGE_SIZE = 64


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

        self.stem = nn.Sequential(block(3, 8), block(8, 16))
        self.down = block(16, 32)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        f1 = self.stem(x)
        return OrderedDict([("0", f1), ("1", self.down(f1))])


def tiny_ssd(num_classes: int, seed: int = 0) -> SSD:
    torch.manual_seed(seed)
    anchors = DefaultBoxGenerator([[2], [2]])
    head = SSDHead([16, 32], anchors.num_anchors_per_location(), num_classes)
    model = SSD(
        TinyBackbone(),
        anchors,
        (IMAGE_SIZE, IMAGE_SIZE),
        num_classes,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        head=head,
        score_thresh=0.01,
        nms_thresh=0.45,
        detections_per_img=200,
        topk_candidates=400,
    )
    with torch.no_grad():
        for module in head.classification_head.module_list:
            module.weight.mul_(20.0)
    return model.eval()


def negate_class_logits(onnx_path: Path, out: Path) -> Path:
    """A deliberately broken copy of an export: class_logits negated (wrong classes, same boxes)."""
    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        node.output[:] = ["class_logits_raw" if o == "class_logits" else o for o in node.output]
    model.graph.node.append(
        onnx.helper.make_node("Neg", ["class_logits_raw"], ["class_logits"], name="broken")
    )
    onnx.save(model, str(out))
    return out
