"""The reference training recipe: a torchvision SSD from scratch on a COCO dataset, within a time budget.

Why it looks the way it does: the whole recipe (dataset generation, training, pycocotools evaluation)
must fit one 10-minute GPU call. So the train split is decoded once into a uint8 tensor on the device,
batches are augmented on the device (`augment.py`), the loss and the periodic evaluation use batched
equivalents of torchvision's per-image loops (`batched.py`), the network runs in bf16 autocast with
channels_last, and the number of epochs is planned from the measured epoch time so the run always ends
inside `time_budget_s` with a fully annealed cosine schedule. The final val mAP uses the model's own
torchvision post-processing (`ssdopt.evaluate.accuracy.predict_dataset`) and pycocotools.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssdopt.data.coco import CocoDataset, load_coco
from ssdopt.data.images import read_image
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.accuracy import (
    coco_evaluate,
    detections_to_coco,
    label_to_category,
    predict_dataset,
)
from ssdopt.fileio import write_json
from ssdopt.models.augment import AugmentConfig, augment_batch, normalize
from ssdopt.models.batched import postprocess_batch, ssd_loss
from ssdopt.models.zoo import anchors_for, build_model, model_image_size, save_checkpoint

PLAN_AFTER_EPOCHS = 2  # epochs timed before the epoch count is fixed (the first includes cuDNN autotuning)
EVAL_BATCH = 250


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint and training.json)."""

    dataset: Path  # root holding train.json + train/ and val.json + val/
    out: Path  # checkpoint path (.safetensors)
    model: str = "ssdlite320_mobilenet_v3_large"
    batch_size: int = 128
    max_epochs: int = 600
    time_budget_s: float = 420.0  # wall time of the epoch loop incl. periodic evals; <= 0: run max_epochs
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 3.0
    grad_clip: float = 10.0  # max gradient norm; 0 disables
    amp: str = "bf16"  # bf16 | fp16 | off
    augment: bool = True
    eval_every: int = 25  # epochs between periodic val mAP evaluations; 0 disables
    final_eval: str = "torchvision"  # torchvision (the model's own post-processing) | fast (batched)
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    history: Path | None = None  # training.json; default: beside the checkpoint
    limit_train: int | None = None  # first N train images only (smoke runs)
    limit_val: int | None = None  # first N val images only
    workers: int = 8  # image-decoding threads

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class SplitTensors:
    """A split decoded once: images uint8 [N, 3, S, S] and padded targets at S x S, all on one device."""

    dataset: CocoDataset
    images: torch.Tensor  # uint8 [N, 3, S, S]
    boxes: torch.Tensor  # float32 [N, G, 4] x1y1x2y2 pixels at S
    labels: torch.Tensor  # int64 [N, G], 0 = padding
    scale: torch.Tensor  # float32 [N, 2] original (width, height) / S, to map predictions back


@dataclass
class TrainResult:
    checkpoint: Path
    history: Path
    metrics: dict[str, Any]
    epochs: int
    wall_time_s: float
    history_data: dict[str, Any] = field(repr=False, default_factory=dict)


def subset(ds: CocoDataset, limit: int | None) -> CocoDataset:
    """The first `limit` images of a split with their annotations (the whole split if limit is None)."""
    if limit is None or limit >= len(ds.images):
        return ds
    if limit < 1:
        raise SsdoptError(f"limit={limit}", "a positive number of images", "pass a larger limit or none")
    images = ds.images[:limit]
    keep = {im.id for im in images}
    return CocoDataset(
        path=ds.path,
        image_dir=ds.image_dir,
        images=images,
        annotations=[a for a in ds.annotations if a.image_id in keep],
        categories=ds.categories,
    )


def load_split(ds: CocoDataset, image_size: int, device: torch.device, workers: int = 8) -> SplitTensors:
    """Decode every image of `ds` (resized to image_size x image_size) and its non-crowd boxes to `device`."""
    label_map = ds.label_map()
    count = len(ds.images)
    images = torch.empty((count, 3, image_size, image_size), dtype=torch.uint8)

    def decode(i: int) -> None:
        pixels = read_image(ds.image_path(ds.images[i]), size=image_size)
        images[i] = torch.from_numpy(np.rint(pixels * 255.0).astype(np.uint8))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(decode, range(count)))
    per_image = [[a for a in ds.annotations_for(im.id) if not a.iscrowd] for im in ds.images]
    max_boxes = max(1, max(len(a) for a in per_image))
    boxes = torch.zeros((count, max_boxes, 4), dtype=torch.float32)
    labels = torch.zeros((count, max_boxes), dtype=torch.int64)
    scale = torch.empty((count, 2), dtype=torch.float32)
    for i, (image, image_annotations) in enumerate(zip(ds.images, per_image, strict=True)):
        sx, sy = image_size / image.width, image_size / image.height
        scale[i] = torch.tensor([1.0 / sx, 1.0 / sy])
        for j, a in enumerate(image_annotations):
            x, y, w, h = a.bbox
            boxes[i, j] = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            labels[i, j] = label_map[a.category_id] if w > 0 and h > 0 else 0
    return SplitTensors(ds, images.to(device), boxes.to(device), labels.to(device), scale.to(device))


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 1% to 100%, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SsdoptError(
            f"device '{name}'", "a visible CUDA GPU", "pass --device cpu or run on a GPU machine"
        )
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """No weight decay on BatchNorm parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused)
    raise SsdoptError(f"optimizer '{cfg.optimizer}'", "adamw or sgd", "pass --optimizer adamw")


def _check_config(cfg: TrainConfig) -> None:
    if cfg.batch_size < 2:
        raise SsdoptError(
            f"batch_size={cfg.batch_size}", "at least 2 (BatchNorm)", "pass e.g. --batch-size 128"
        )
    if cfg.amp not in ("bf16", "fp16", "off"):
        raise SsdoptError(f"amp '{cfg.amp}'", "bf16, fp16 or off", "pass --amp bf16")
    if cfg.final_eval not in ("torchvision", "fast"):
        raise SsdoptError(
            f"final_eval '{cfg.final_eval}'", "torchvision or fast", "pass --final-eval torchvision"
        )
    if cfg.max_epochs < 1 or cfg.lr <= 0:
        raise SsdoptError("max_epochs / lr", "max_epochs >= 1 and lr > 0", "fix the training parameters")


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last pays on the GPU (cuDNN NHWC kernels); on the CPU it only slows the first steps."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def head_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backbone + head on normalised images [B, 3, S, S].

    Returns {"bbox_regression" [B, A, 4], "cls_logits" [B, A, C]}.
    """
    features = list(model.backbone(x).values())
    return model.head(features)


@torch.no_grad()
def evaluate_fast(
    model: torch.nn.Module, split: SplitTensors, anchors: torch.Tensor, max_detections: int | None = None
) -> dict[str, Any]:
    """val mAP with the batched post-processing (fp32). Capping at 100 detections per image leaves every
    pycocotools metric unchanged (they all use at most 100) and makes COCOeval faster."""
    was_training = model.training
    model.eval()
    mean = torch.tensor(model.transform.image_mean, device=anchors.device)
    std = torch.tensor(model.transform.image_std, device=anchors.device)
    size = split.images.shape[-1]
    label_map = label_to_category(split.dataset)
    detections: list[dict[str, Any]] = []
    for start in range(0, split.images.shape[0], EVAL_BATCH):
        x = normalize(split.images[start : start + EVAL_BATCH], mean, std)
        x = x.contiguous(memory_format=_memory_format(x.device))
        out = head_outputs(model, x)
        results = postprocess_batch(
            out["cls_logits"],
            out["bbox_regression"],
            anchors,
            model.box_coder,
            (size, size),
            score_thresh=model.score_thresh,
            nms_thresh=model.nms_thresh,
            topk_candidates=model.topk_candidates,
            detections_per_img=max_detections or model.detections_per_img,
        )
        for offset, result in enumerate(results):
            i = start + offset
            boxes = result["boxes"] * split.scale[i].repeat(2)
            image_id = split.dataset.images[i].id
            detections += detections_to_coco(image_id, boxes, result["scores"], result["labels"], label_map)
    model.train(was_training)
    return coco_evaluate(split.dataset, detections)


def _dataset_manifest(root: Path) -> dict[str, Any]:
    """The generator's dataset.json (seed, version, classes) if the data came from `ssdopt data generate`."""
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return {}
    return {
        k: data[k] for k in ("generator", "generator_version", "seed", "image_size", "classes") if k in data
    }


def _summary(metrics: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    keys = (("mAP", "map"), ("mAP@.5", "map_50"), ("AR@100", "ar_100"))
    return " ".join(f"{label} {fmt(metrics.get(key))}" for label, key in keys)


def load_datasets(cfg: TrainConfig) -> tuple[CocoDataset, CocoDataset]:
    """train and val splits of cfg.dataset (same categories required)."""
    root = Path(cfg.dataset)
    train_ds = subset(load_coco(root / "train.json"), cfg.limit_train)
    val_ds = subset(load_coco(root / "val.json"), cfg.limit_val)
    if train_ds.class_names() != val_ds.class_names():
        raise SsdoptError(
            root / "val.json",
            f"the same categories as train.json ({train_ds.class_names()[1:]})",
            "generate both splits with the same generator",
        )
    if not train_ds.annotations:
        raise SsdoptError(
            root / "train.json", "annotations to train on (it has none)", "regenerate the dataset"
        )
    return train_ds, val_ds


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train `cfg.model` from scratch on cfg.dataset/train.json, evaluate on val.json, write the checkpoint
    (safetensors + metadata) and training.json (config, per-epoch history, evaluations), both atomically."""
    _check_config(cfg)
    wall_start = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_ds, val_ds = load_datasets(cfg)
    class_names = train_ds.class_names()
    model = build_model(cfg.model, len(class_names)).to(device)
    size = model_image_size(model)

    t = time.perf_counter()
    train_split = load_split(train_ds, size, device, cfg.workers)
    val_split = load_split(val_ds, size, device, cfg.workers)
    decode_s = time.perf_counter() - t
    log(
        f"decoded {len(train_ds.images)} train + {len(val_ds.images)} val images "
        f"in {decode_s:.1f} s on {device}"
    )

    model = model.to(memory_format=_memory_format(device))
    anchors = anchors_for(model, size, device)
    mean = torch.tensor(model.transform.image_mean, device=device)
    std = torch.tensor(model.transform.image_std, device=device)
    optimizer = _optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    augment_cfg = AugmentConfig() if cfg.augment else AugmentConfig(photometric=0, flip=0, zoom_probability=0)

    base_meta = {
        "model": cfg.model,
        "num_classes": len(class_names),
        "class_names": class_names,
        "image_size": size,
        "seed": cfg.seed,
        "recipe": cfg.to_json(),
        "device": device_name(device),
        "torch": torch.__version__,
    }
    count = train_split.images.shape[0]
    batch = min(cfg.batch_size, count)
    steps_per_epoch = max(1, count // batch)
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    planned_epochs = cfg.max_epochs
    epochs: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    eval_cost_s = 0.0
    step = 0
    loop_start = time.perf_counter()
    stop_reason = "max_epochs"
    model.train()
    epoch = 0
    while epoch < planned_epochs:
        epoch += 1
        epoch_start = time.perf_counter()
        order = torch.randperm(count, generator=gen, device=device)
        sums = torch.zeros(3, device=device)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            if cfg.augment:
                x, boxes, labels = augment_batch(
                    train_split.images[idx],
                    train_split.boxes[idx],
                    train_split.labels[idx],
                    mean,
                    std,
                    augment_cfg,
                    gen,
                )
            else:
                x, boxes, labels = (
                    normalize(train_split.images[idx], mean, std),
                    train_split.boxes[idx],
                    train_split.labels[idx],
                )
            x = x.contiguous(memory_format=_memory_format(device))
            factor = lr_factor(step, planned_epochs * steps_per_epoch, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            with _autocast(device, cfg.amp):
                out = head_outputs(model, x)
            losses = ssd_loss(
                out["cls_logits"],
                out["bbox_regression"],
                anchors,
                boxes,
                labels,
                model.box_coder,
                model.neg_to_pos_ratio,
            )
            loss = losses["bbox_regression"] + losses["classification"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            sums += torch.stack(
                [loss.detach(), losses["bbox_regression"].detach(), losses["classification"].detach()]
            )
            step += 1
        mean_losses = (sums / steps_per_epoch).tolist()  # one host sync per epoch
        epoch_s = time.perf_counter() - epoch_start
        if not all(math.isfinite(v) for v in mean_losses):
            raise SsdoptError(
                f"training of {cfg.model} (epoch {epoch})",
                f"a finite loss, got {mean_losses[0]}",
                f"lower the learning rate (now --lr {cfg.lr}) or use --amp off",
            )
        record = {
            "epoch": epoch,
            "loss": mean_losses[0],
            "bbox_loss": mean_losses[1],
            "cls_loss": mean_losses[2],
            "lr": cfg.lr * lr_factor(step - 1, planned_epochs * steps_per_epoch, warmup_steps),
            "epoch_s": round(epoch_s, 3),
            "elapsed_s": round(time.perf_counter() - loop_start, 3),
        }
        epochs.append(record)
        line = (
            f"epoch {epoch}/{planned_epochs} loss {mean_losses[0]:.4f} "
            f"(box {mean_losses[1]:.4f} cls {mean_losses[2]:.4f}) lr {record['lr']:.2e} {epoch_s:.1f}s"
        )
        is_last = epoch == planned_epochs
        if cfg.eval_every and epoch % cfg.eval_every == 0 and not is_last:
            t = time.perf_counter()
            metrics = evaluate_fast(model, val_split, anchors, max_detections=100)
            eval_cost_s = time.perf_counter() - t
            evals.append({"epoch": epoch, "eval_s": round(eval_cost_s, 2), **_flat(metrics)})
            # a usable checkpoint exists even if the run is killed later (marked partial)
            save_checkpoint(
                model, cfg.out, {**base_meta, "epochs": epoch, "partial": True, "val": _flat(metrics)}
            )
            line += f" | val {_summary(metrics)} ({eval_cost_s:.1f}s)"
        log(line)
        elapsed = time.perf_counter() - loop_start
        if cfg.time_budget_s > 0 and epoch == min(PLAN_AFTER_EPOCHS, planned_epochs - 1):
            per_epoch = epoch_s + (eval_cost_s or 3.0) / max(1, cfg.eval_every or 10**9)
            remaining = 0.97 * cfg.time_budget_s - elapsed
            planned_epochs = max(epoch + 1, min(cfg.max_epochs, epoch + int(remaining // per_epoch)))
            log(f"planned {planned_epochs} epochs ({epoch_s:.2f} s/epoch, budget {cfg.time_budget_s:.0f} s)")
        if cfg.time_budget_s > 0 and epoch < planned_epochs and elapsed + epoch_s > cfg.time_budget_s:
            stop_reason = "time_budget"
            log(
                f"stopping after epoch {epoch}: "
                f"the next epoch would exceed the {cfg.time_budget_s:.0f} s budget"
            )
            break
    loop_s = time.perf_counter() - loop_start

    model.eval()
    t = time.perf_counter()
    if cfg.final_eval == "torchvision":
        detections = predict_dataset(model, val_ds, batch_size=64, device=device, progress=False)
        final = coco_evaluate(val_ds, detections)
    else:
        final = evaluate_fast(model, val_split, anchors)
    final_eval_s = time.perf_counter() - t
    log(f"final val ({cfg.final_eval} post-processing, {final_eval_s:.1f}s): {_summary(final)}")
    model = model.to(memory_format=torch.contiguous_format).cpu()

    wall_s = time.perf_counter() - wall_start
    meta = {
        **base_meta,
        "epochs": epoch,
        "dataset": {
            "root": str(cfg.dataset),
            "train_images": count,
            "val_images": len(val_ds.images),
            **_dataset_manifest(Path(cfg.dataset)),
        },
        "val": _flat(final),
        "val_post_processing": cfg.final_eval,
        "train_wall_time_s": round(wall_s, 1),
    }
    checkpoint = save_checkpoint(model, cfg.out, meta)
    history = {
        "config": cfg.to_json(),
        "device": device_name(device),
        "torch": torch.__version__,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch,
        "epochs_planned": planned_epochs,
        "epochs_run": epoch,
        "stop_reason": stop_reason,
        "timing_s": {
            "decode": round(decode_s, 1),
            "epoch_loop": round(loop_s, 1),
            "final_eval": round(final_eval_s, 1),
            "total": round(wall_s, 1),
        },
        "epochs": epochs,
        "evals": evals,
        "final_val": final,
        "checkpoint": str(checkpoint),
    }
    history_path = write_json(
        history, Path(cfg.history) if cfg.history else checkpoint.with_name("training.json")
    )
    return TrainResult(checkpoint, history_path, final, epoch, wall_s, history)


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-class table (for compact logs)."""
    return {k: v for k, v in metrics.items() if k != "per_class"}


__all__ = ["TrainConfig", "TrainResult", "anchors_for", "load_split", "lr_factor", "subset", "train"]
