"""CLI commands for models: `ssdopt train`, `ssdopt export`, `ssdopt evaluate-checkpoint`.

Thin wrappers: each reads its defaults from params.yaml (sections model, train, generate, export) and calls
the library. Registered in ssdopt/cli.py; `python -m ssdopt.commands_models <command>` runs them standalone
(the device script uses that form).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ssdopt.config import pick, section


def train(
    dataset: Path | None = typer.Option(
        None, help="Dataset root with train.json/val.json (params: generate.out)."
    ),
    out: Path | None = typer.Option(None, help="Checkpoint to write (params: model.checkpoint)."),
    model: str | None = typer.Option(None, help="torchvision SSD builder (params: model.name)."),
    seed: int | None = typer.Option(None, help="Seed of initialisation, shuffling and augmentation."),
    batch_size: int | None = typer.Option(None, help="Images per step."),
    max_epochs: int | None = typer.Option(None, help="Upper bound on epochs."),
    time_budget_s: float | None = typer.Option(None, help="Wall-time budget of the epoch loop; <= 0: none."),
    optimizer: str | None = typer.Option(None, help="adamw | sgd"),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    weight_decay: float | None = typer.Option(None, help="Weight decay (not on BatchNorm/bias)."),
    warmup_epochs: float | None = typer.Option(None, help="Linear warmup length in epochs."),
    amp: str | None = typer.Option(None, help="bf16 | fp16 | off"),
    eval_every: int | None = typer.Option(
        None, help="Epochs between val mAP evaluations; 0: only at the end."
    ),
    final_eval: str | None = typer.Option(None, help="torchvision | fast post-processing for the final mAP."),
    device: str | None = typer.Option(None, help="auto | cuda | cpu"),
    limit_train: int | None = typer.Option(None, help="Use only the first N train images (smoke runs)."),
    limit_val: int | None = typer.Option(None, help="Use only the first N val images."),
    history: Path | None = typer.Option(None, help="training.json path (default: beside the checkpoint)."),
    workers: int | None = typer.Option(None, help="Image-decoding threads."),
) -> None:
    """Train the reference SSD from scratch on the synthetic train split; report val mAP (pycocotools)."""
    from ssdopt.models.train import TrainConfig
    from ssdopt.models.train import train as run_training

    p, m, g = section("train"), section("model"), section("generate")
    base = TrainConfig(dataset=Path("."), out=Path("."))
    cfg = TrainConfig(
        dataset=Path(pick(dataset, g, "out", "data/synthetic")),
        out=Path(pick(out, m, "checkpoint", "data/reference/ssdlite320_shapes.safetensors")),
        model=pick(model, m, "name", base.model),
        seed=pick(seed, p, "seed", base.seed),
        batch_size=pick(batch_size, p, "batch_size", base.batch_size),
        max_epochs=pick(max_epochs, p, "max_epochs", base.max_epochs),
        time_budget_s=pick(time_budget_s, p, "time_budget_s", base.time_budget_s),
        optimizer=pick(optimizer, p, "optimizer", base.optimizer),
        lr=pick(lr, p, "lr", base.lr),
        weight_decay=pick(weight_decay, p, "weight_decay", base.weight_decay),
        warmup_epochs=pick(warmup_epochs, p, "warmup_epochs", base.warmup_epochs),
        amp=pick(amp, p, "amp", base.amp),
        eval_every=pick(eval_every, p, "eval_every", base.eval_every),
        final_eval=pick(final_eval, p, "final_eval", base.final_eval),
        device=pick(device, p, "device", base.device),
        limit_train=limit_train,
        limit_val=limit_val,
        history=history,
        workers=pick(workers, p, "workers", base.workers),
    )
    result = run_training(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo(
        f"checkpoint {result.checkpoint} ({result.epochs} epochs, {result.wall_time_s:.0f} s); "
        f"val mAP {result.metrics['map']:.4f}, mAP@.5 {result.metrics['map_50']:.4f}; "
        f"history {result.history}"
    )


def export(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint (params: model.checkpoint)."),
    out: Path | None = typer.Option(None, help="Output directory (params: export.out)."),
    opset: int | None = typer.Option(None, help="ONNX opset, >= 18 (params: export.opset)."),
    image_size: int | None = typer.Option(None, help="Square input side (params: model.image_size)."),
    tolerance: float | None = typer.Option(None, help="Max abs difference allowed vs torch (ORT CPU)."),
    model: str | None = typer.Option(
        None, help="Architecture of a .pth state dict (default: recognised from its tensors)."
    ),
    num_classes: int | None = typer.Option(None, help="Classes + background the state dict must have."),
    class_names: str | None = typer.Option(None, help="Comma list of class names (no background)."),
    dataset: Path | None = typer.Option(
        None, help="COCO json (or folder with annotations/instances_*.json) to take class names from."
    ),
) -> None:
    """Export backbone+head to ONNX (+ unfolded BN variant, anchors.npy, export.json), parity-checked.

    --checkpoint takes an ssdopt .safetensors or a torchvision state dict (.pth/.pt, plain
    .safetensors): architecture and class count are read off its tensors, never downloaded."""
    from ssdopt.export import export_checkpoint

    m, e = section("model"), section("export")
    names = [n.strip() for n in class_names.split(",") if n.strip()] if class_names else None
    if dataset is not None and names is None:
        from ssdopt.data.coco import load_coco, resolve_split

        names = load_coco(*resolve_split(dataset)).class_names()
    path = export_checkpoint(
        Path(pick(checkpoint, m, "checkpoint", "data/reference/ssdlite320_shapes.safetensors")),
        Path(pick(out, e, "out", "artifacts/onnx")),
        image_size=pick(image_size, m, "image_size", None),
        opset=pick(opset, e, "opset", 18),
        tolerance=pick(tolerance, e, "tolerance", 1e-4),
        model_name=model,
        num_classes=num_classes,
        class_names=names,
    )
    typer.echo(f"exported to {path}")


def evaluate_checkpoint(
    checkpoint: Path | None = typer.Option(None, help="Checkpoint (params: model.checkpoint)."),
    dataset: Path | None = typer.Option(
        None, help="COCO json or dataset folder, ssdopt or COCO layout (params: generate.out)."
    ),
    split: str = typer.Option("val", help="Split to evaluate, where --dataset is a folder."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Path | None = typer.Option(None, help="Write the metrics as JSON here."),
) -> None:
    """COCO mAP (pycocotools) of a checkpoint with its own torchvision post-processing."""
    from ssdopt.data.coco import resolve_split
    from ssdopt.evaluate.accuracy import evaluate_checkpoint as run_evaluation

    m, g = section("model"), section("generate")
    coco_json, image_dir = resolve_split(Path(pick(dataset, g, "out", "data/synthetic")), split)
    metrics = run_evaluation(
        Path(pick(checkpoint, m, "checkpoint", "data/reference/ssdlite320_shapes.safetensors")),
        coco_json,
        image_dir=image_dir,
        batch_size=batch_size,
        device=device,
        out=out,
    )
    per_class = metrics.pop("per_class")
    typer.echo(json.dumps({**metrics, "per_class": per_class}, indent=1))


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.command("train")(train)
app.command("export")(export)
app.command("evaluate-checkpoint")(evaluate_checkpoint)

if __name__ == "__main__":
    from ssdopt.errors import SsdoptError

    try:
        app(standalone_mode=False)
    except SsdoptError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(exc.exit_code) from exc
