"""Invalid parameters and checkpoints: refused before any work, exit code 2, nothing written, the
MLflow registry untouched; and the SSDDecodeNMS op fed non-finite values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


def _build(cli, tiny_export, *extra: str):
    return cli("build", "--onnx", str(tiny_export.model), "--out", "engines", *extra)


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        (("--backend", "tflite"), ("--backend tflite", "onnxruntime, openvino")),
        (("--precision", "int4"), ("--precision int4", "fp32, fp16, bf16, int8")),
        (("--max-batch", "0"), ("--max-batch 0", "--max-batch 1 or more")),
        (("--device", "tpu"), ("device 'tpu'", "cpu or cuda")),
        (
            ("--precision", "int8", "--method", "kl"),
            ("calibration method 'kl'", "minmax, entropy, percentile"),
        ),
        (("--precision", "bf16"), ("--precision bf16", "fp32, int8")),
    ],
    ids=[
        "unknown_backend",
        "unknown_precision",
        "batch_0",
        "unknown_device",
        "unknown_method",
        "bf16_on_ort",
    ],
)
def test_invalid_build_parameters(workdir, cli, refused, snapshot, tiny_export, flags, mentions) -> None:
    before = snapshot(workdir)
    refused(_build(cli, tiny_export, *flags), *mentions, root=workdir, before=before)


@pytest.mark.parametrize("score", ["-0.5", "1.5", "nan"])
def test_detect_min_score_out_of_range(
    workdir, cli, refused, snapshot, tiny_engine, image_file, score
) -> None:
    image = image_file(workdir.parent / "a.png")
    before = snapshot(workdir)
    result = cli(
        "detect", "--engine", str(tiny_engine), "--out", "detections", "--min-score", score, str(image)
    )
    refused(result, f"--min-score {float(score)}", "[0, 1]", root=workdir, before=before)


def test_evaluate_negative_limit(workdir, cli, refused, snapshot, tiny_engine) -> None:
    from ssdopt.data.coco import write_coco

    dataset = write_coco(
        {
            "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
            "categories": [{"id": 1, "name": "x"}],
        },
        workdir.parent / "val.json",
    )
    before = snapshot(workdir)
    result = cli("evaluate", str(tiny_engine), "--dataset", str(dataset), "--limit", "-1")
    refused(result, "--limit -1", ">= 0", root=workdir, before=before)


def test_calibration_unknown_strategy(workdir, cli, refused, snapshot, image_file) -> None:
    root = workdir.parent / "dataset"
    image_file(root / "train" / "0.png", size=16)
    (root / "train.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "0.png", "width": 16, "height": 16}],
                "annotations": [],
                "categories": [{"id": 1, "name": "x"}],
            }
        )
    )
    before = snapshot(workdir)
    result = cli("data", "calibration", "--dataset", str(root), "--out", "calibration", "--strategy", "best")
    refused(result, "strategy", "random, class-balanced", root=workdir, before=before)


@pytest.mark.parametrize("budget", ["-1", "nan"])
def test_promote_invalid_budget_leaves_the_registry_alone(workdir, cli, refused, snapshot, budget) -> None:
    """The registry store (mlflow/ under the working directory) is neither created nor changed."""
    (workdir / "params.yaml").write_text("optimize:\n  mlflow_root: mlflow\n")
    (workdir / "mlflow").mkdir()
    (workdir / "mlflow" / "mlflow.db").write_bytes(b"stand-in for the registry database")
    before = snapshot(workdir)
    refused(
        cli("promote", "--budget", budget), f"--budget {float(budget)}", ">= 0", root=workdir, before=before
    )


# ---- checkpoints -----------------------------------------------------------------------------------


def _checkpoint(path: Path, poison: bool = False) -> Path:
    from safetensors.torch import save_file

    from ssdopt.models.zoo import build_model

    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if poison:
        key = next(k for k in tensors if k.endswith("weight") and tensors[k].is_floating_point())
        tensors[key].view(-1)[0] = float("nan")
    meta = {"model": "ssdlite320_mobilenet_v3_large", "num_classes": 3, "class_names": ["bg", "a", "b"]}
    save_file(tensors, str(path), metadata={"ssdopt": json.dumps(meta)})
    return path


def test_nan_weights_in_a_checkpoint(workdir, cli, refused, snapshot) -> None:
    checkpoint = _checkpoint(workdir.parent / "diverged.safetensors", poison=True)
    before = snapshot(workdir)
    result = cli("export", "--checkpoint", str(checkpoint), "--out", "onnx")
    refused(result, "diverged.safetensors", "NaN/Inf", "retrain", root=workdir, before=before)


def test_truncated_checkpoint(workdir, cli, refused, snapshot) -> None:
    checkpoint = _checkpoint(workdir.parent / "whole.safetensors")
    cut = workdir.parent / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    before = snapshot(workdir)
    result = cli("export", "--checkpoint", str(cut), "--out", "onnx")
    refused(result, "cut.safetensors", "readable safetensors checkpoint", root=workdir, before=before)


# ---- SSDDecodeNMS --------------------------------------------------------------------------------


def _head(batch: int = 1, anchors: int = 8, classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    deltas = torch.randn(batch, anchors, 4, generator=generator) * 0.1
    logits = torch.randn(batch, anchors, classes, generator=generator)
    xy = torch.rand(anchors, 2, generator=generator) * 200
    boxes = torch.cat([xy, xy + 40], dim=1)
    return deltas, logits, boxes


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("score_threshold", -0.1),
        ("score_threshold", math.nan),
        ("iou_threshold", 1.5),
        ("iou_threshold", math.inf),
    ],
)
def test_decode_nms_refuses_thresholds_outside_0_1(api_refused, attribute, value) -> None:
    from ssdopt.ops import decode_nms, reference_decode_nms
    from ssdopt.ops.onnx_node import add_decode_nms_node  # noqa: F401 - same attributes path

    deltas, logits, anchors = _head()
    api_refused(
        f"ssdopt.ops.decode_nms(..., {attribute}={value})",
        lambda: decode_nms(deltas, logits, anchors, **{attribute: value}),
        attribute,
        "[0, 1]",
    )
    api_refused(
        f"reference_decode_nms(..., {attribute}={value})",
        lambda: reference_decode_nms(deltas, logits, anchors, **{attribute: value}),
        attribute,
    )


def test_decode_nms_node_refuses_iou_above_one(api_refused, tiny_export) -> None:
    import numpy as np
    import onnx

    from ssdopt.ops.onnx_node import add_decode_nms_node

    model = onnx.load(str(tiny_export.model))
    anchors = np.load(tiny_export.anchors)
    api_refused(
        "add_decode_nms_node(model, anchors, iou_threshold=1.2)",
        lambda: add_decode_nms_node(model, anchors, iou_threshold=1.2, image_height=64, image_width=64),
        "iou_threshold=1.2",
    )


def test_decode_nms_non_finite_tensors_follow_the_documented_rule(accepted) -> None:
    """NaN/+inf logits: that anchor yields no detection; NaN deltas give NaN boxes that are kept
    (torchvision semantics, DESIGN.md); no NaN ever reaches a score, nothing crashes."""
    from ssdopt.ops import reference_decode_nms

    deltas, logits, anchors = _head(anchors=6)
    logits[0, :, 1] = 5.0  # every anchor clearly class 1
    logits[0, 1, 2] = math.nan
    logits[0, 2, 2] = math.inf
    deltas[0, 3] = math.nan
    num, boxes, scores, labels = reference_decode_nms(
        deltas, logits, anchors, score_threshold=0.5, iou_threshold=0.99, image_height=300, image_width=300
    )
    n = int(num[0])
    assert torch.isfinite(scores[0, :n]).all()
    assert n == 4  # anchors 1 and 2 dropped; 0, 3, 4, 5 kept
    assert (
        int(torch.isnan(boxes[0, :n]).any(dim=1).sum()) == 1
    )  # anchor 3's NaN box, kept as torchvision does
    accepted(
        "reference_decode_nms(logits with NaN/+inf, deltas with NaN)",
        f"no error: {n} detections, scores finite; NaN/+inf-logit anchors dropped, NaN-delta box kept "
        "(torchvision semantics, DESIGN.md)",
    )
