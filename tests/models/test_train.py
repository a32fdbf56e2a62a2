"""Training recipe: GPU-style batch augmentation (checked on pixels), LR schedule, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssdopt.errors import SsdoptError
from ssdopt.models.augment import AugmentConfig, augment_batch, normalize
from ssdopt.models.train import TrainConfig, lr_factor, subset, train
from ssdopt.models.zoo import load_checkpoint

S = 64
ZERO, ONE = torch.zeros(3), torch.ones(3)


def _rectangles(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Black images with one white rectangle each, its box, label 1; plus a padding slot."""
    images = torch.zeros(batch, 3, S, S, dtype=torch.uint8)
    boxes = torch.zeros(batch, 2, 4)
    labels = torch.zeros(batch, 2, dtype=torch.int64)
    for i in range(batch):
        x0, y0 = torch.randint(0, S - 20, (2,), generator=gen).tolist()
        w, h = torch.randint(8, 20, (2,), generator=gen).tolist()
        images[i, :, y0 : y0 + h, x0 : x0 + w] = 255
        boxes[i, 0] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        labels[i, 0] = 1
    return images, boxes, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warped_boxes_follow_the_warped_pixels(seed):
    gen = torch.Generator().manual_seed(seed)
    images, boxes, labels = _rectangles(gen, 32)
    cfg = AugmentConfig(
        photometric=0.0,
        flip=0.5,
        zoom_probability=1.0,
        zoom_min=0.6,
        zoom_max=1.6,
        min_visible=0.0,
        min_side_px=0.0,
    )
    x, new_boxes, new_labels = augment_batch(images, boxes, labels, ZERO, ONE, cfg, gen)
    assert x.shape == (32, 3, S, S) and (new_labels[:, 1] == 0).all()
    checked = 0
    for i in range(32):
        mask = x[i, 0] > 0.5
        if new_labels[i, 0] == 0:
            assert mask.sum() <= 2  # dropped only when (almost) nothing is left in the frame
            continue
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs) == 0:
            continue
        pixel_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (pixel_box - new_boxes[i, 0]).abs().max() <= 1.5, (i, pixel_box, new_boxes[i, 0])
        checked += 1
    assert checked >= 25


def test_boxes_cut_by_the_crop_lose_their_label():
    images = torch.zeros(1, 3, S, S, dtype=torch.uint8)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [27.0, 27.0, 37.0, 37.0]]])
    labels = torch.tensor([[1, 2]])
    cfg = AugmentConfig(photometric=0.0, flip=0.0, zoom_probability=1.0, zoom_min=2.0, zoom_max=2.0)
    gen = torch.Generator().manual_seed(0)
    # zoom x2 keeps the centre region; the corner box leaves the frame unless the shift is extreme
    _, out_boxes, out_labels = augment_batch(images, boxes, labels, ZERO, ONE, cfg, gen)
    assert out_labels[0, 1] == 2 and (out_boxes[0, 1, 2:] - out_boxes[0, 1, :2] - 20).abs().max() < 1e-4
    if out_labels[0, 0] == 0:
        assert (out_boxes[0, 0] == 0).all()


def test_no_augmentation_is_identity():
    gen = torch.Generator().manual_seed(0)
    images, boxes, labels = _rectangles(gen, 4)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    cfg = AugmentConfig(photometric=0.0, flip=0.0, zoom_probability=0.0)
    x, b, lab = augment_batch(images, boxes, labels, mean, std, cfg, gen)
    torch.testing.assert_close(x, normalize(images, mean, std), atol=1e-4, rtol=0)  # grid rounding
    assert torch.equal(b[:, 0], boxes[:, 0]) and torch.equal(lab, labels)


def test_lr_schedule_warms_up_then_anneals_to_zero():
    total, warmup = 1000, 100
    values = [lr_factor(s, total, warmup) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.01) and values[warmup] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values[:warmup], values[1 : warmup + 1], strict=True))
    assert all(b <= a for a, b in zip(values[warmup:-1], values[warmup + 1 :], strict=True))
    assert values[total] == pytest.approx(0.0, abs=1e-12)
    assert values[(total + warmup) // 2] == pytest.approx(0.5, abs=1e-9)
    assert math.isclose(lr_factor(5 * total, total, warmup), 0.0, abs_tol=1e-12)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from ssdopt.data.synthetic import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("data") / "synthetic",
        seed=5,
        image_size=320,
        splits={"train": 8, "val": 4},
        workers=1,
        progress=False,
    )


def test_tiny_run_end_to_end(tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "ref" / "model.safetensors"
    cfg = TrainConfig(
        dataset=tiny_dataset,
        out=out,
        batch_size=4,
        max_epochs=2,
        time_budget_s=0,
        amp="off",
        device="cpu",
        eval_every=1,
        final_eval="torchvision",
        lr=1e-3,
        workers=2,
        seed=3,
    )
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    assert (
        result.epochs == 2 and result.checkpoint == out and result.history == out.with_name("training.json")
    )
    history = json.loads(result.history.read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and len(history["evals"]) == 1
    assert all(math.isfinite(e["loss"]) for e in history["epochs"])
    assert history["final_val"]["num_images"] == 4 and history["stop_reason"] == "max_epochs"
    model, meta = load_checkpoint(out)
    assert meta["epochs"] == 2 and "partial" not in meta and meta["num_classes"] == 11
    assert meta["dataset"]["seed"] == 5 and meta["recipe"]["batch_size"] == 4
    assert meta["val"]["map"] == history["final_val"]["map"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors", "training.json"]
    assert any("epoch 2/2" in line for line in lines)


def test_bad_training_inputs_leave_nothing(tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "x" / "model.safetensors"
    with pytest.raises(SsdoptError, match="train.json"):
        train(TrainConfig(dataset=tmp_path / "nowhere", out=out, device="cpu"))
    with pytest.raises(SsdoptError, match="amp"):
        train(TrainConfig(dataset=tiny_dataset, out=out, amp="fp8", device="cpu"))
    with pytest.raises(SsdoptError, match="optimizer"):
        train(
            TrainConfig(
                dataset=tiny_dataset,
                out=out,
                optimizer="lion",
                device="cpu",
                limit_train=2,
                limit_val=1,
                batch_size=2,
            )
        )
    assert not out.parent.exists()


def test_subset_keeps_annotations_of_kept_images(tiny_dataset: Path):
    from ssdopt.data.coco import load_coco

    ds = load_coco(tiny_dataset / "train.json")
    part = subset(ds, 3)
    assert [im.id for im in part.images] == [im.id for im in ds.images[:3]]
    assert {a.image_id for a in part.annotations} <= {im.id for im in part.images}
    assert len(part.annotations) == sum(len(ds.annotations_for(im.id)) for im in part.images)
    assert subset(ds, None) is ds
