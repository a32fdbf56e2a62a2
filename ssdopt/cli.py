"""The `ssdopt` command line: thin wrappers over the library; SsdoptError becomes exit code 2."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import typer

from ssdopt.config import pick, section
from ssdopt.errors import SsdoptError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Synthetic dataset and calibration set.")
plugin_app = typer.Typer(no_args_is_help=True, help="The SSDDecodeNMS native plugin.")
track_app = typer.Typer(no_args_is_help=True, help="MLflow: log engines built and measured elsewhere.")
app.add_typer(data_app, name="data")
app.add_typer(plugin_app, name="plugin")
app.add_typer(track_app, name="track")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"ssdopt {version('ssdopt')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Options of `ssdopt` itself (before the command)."""


@data_app.command("generate")
def data_generate(
    out: Path | None = typer.Option(None, help="Output directory (params: generate.out)."),
    seed: int | None = typer.Option(None, help="Random seed; same seed, same bytes."),
    train: int | None = typer.Option(None, help="Images in the train split."),
    val: int | None = typer.Option(None, help="Images in the val split."),
    test: int | None = typer.Option(None, help="Images in the test split."),
    image_size: int | None = typer.Option(None, help="Square image side in pixels."),
    workers: int = typer.Option(0, help="Worker processes (0: one per core)."),
) -> None:
    """Generate the synthetic COCO-format detection dataset."""
    from ssdopt.data.synthetic import generate_dataset

    p = section("generate")
    splits = {
        "train": pick(train, p, "train", 6000),
        "val": pick(val, p, "val", 1000),
        "test": pick(test, p, "test", 1000),
    }
    path = generate_dataset(
        Path(pick(out, p, "out", "data/synthetic")),
        seed=pick(seed, p, "seed", 0),
        image_size=pick(image_size, p, "image_size", 320),
        splits=splits,
        workers=workers or None,
    )
    typer.echo(f"dataset written to {path}")


@data_app.command("calibration")
def data_calibration(
    dataset: Path = typer.Option(
        None, help="COCO json or dataset folder, ssdopt or COCO layout (params: generate.out)."
    ),
    split: str = typer.Option("train", help="Split to select from, where --dataset is a folder."),
    images: Path | None = typer.Option(None, help="Image folder (default: found beside the json)."),
    out: Path | None = typer.Option(None, help="Output directory (params: calibration.out)."),
    num_images: int | None = typer.Option(None, help="Images to select."),
    strategy: str | None = typer.Option(None, help="random | class-balanced"),
    seed: int | None = typer.Option(None, help="Selection seed."),
) -> None:
    """Select the calibration set from the train split."""
    from ssdopt.data.calibration import select_calibration_set
    from ssdopt.data.coco import resolve_split

    p = section("calibration")
    json_path, image_dir = resolve_split(
        Path(dataset or section("generate").get("out", "data/synthetic")), split, images
    )
    path = select_calibration_set(
        json_path,
        image_dir,
        Path(pick(out, p, "out", "data/calibration")),
        num_images=pick(num_images, p, "num_images", 512),
        strategy=pick(strategy, p, "strategy", "class-balanced"),
        seed=pick(seed, p, "seed", 0),
    )
    typer.echo(f"calibration set written to {path}")


def _register_commands() -> None:
    """Commands that live beside the library modules they wrap."""
    from ssdopt import commands_eval, commands_models
    from ssdopt.commands_engines import build, quantize

    app.command("train")(commands_models.train)
    app.command("export")(commands_models.export)
    app.command("evaluate-checkpoint")(commands_models.evaluate_checkpoint)
    app.command("build")(build)
    app.command("quantize")(quantize)
    app.command("evaluate-engines")(commands_eval.evaluate_engines)
    app.command("bench")(commands_eval.bench)
    app.command("evaluate")(commands_eval.evaluate)
    app.command("detect")(commands_eval.detect)
    app.command("report")(commands_eval.report)


_register_commands()


@plugin_app.command("build")
def plugin_build(
    cuda: bool | None = typer.Option(
        None, "--cuda/--no-cuda", help="CUDA kernel (default: where nvcc is found)."
    ),
    torch_op: bool = typer.Option(True, "--torch/--no-torch", help="Also build the torch op library."),
    force: bool = typer.Option(False, help="Rebuild even if these sources were built."),
    build_dir: Path = typer.Option(
        Path("build/plugins"), help="Root of the content-addressed build folders."
    ),
) -> None:
    """Compile the SSDDecodeNMS kernels and bindings (CMake + torch extension)."""
    from ssdopt.plugin_build import build_all, summary_lines

    for build in build_all(build_root=build_dir, cuda=cuda, force=force, torch_op=torch_op):
        typer.echo("\n".join(summary_lines(build)))


@app.command("promote")
def promote_command(
    target: list[str] = typer.Option(
        None,
        help="Deployment target(s) (params: optimize.target); default: every target with registered "
        "engines, else this machine's CPU and GPU targets.",
    ),
    budget: float | None = typer.Option(None, help="mAP budget in points (params: optimize.map_budget)."),
) -> None:
    """Apply the promotion policy to existing registered engine versions."""
    import math

    from ssdopt.tracking import local_store, promote, promotion_targets

    opt = section("optimize")
    points = float(budget if budget is not None else opt.get("map_budget", 1.0))
    if not (math.isfinite(points) and points >= 0):  # checked before the registry is opened
        raise SsdoptError(f"--budget {points}", "a mAP budget in points >= 0", "pass e.g. --budget 1.0")
    store = local_store(opt.get("mlflow_root", "mlflow"))
    explicit = target or ([opt["target"]] if opt.get("target") else None)
    for name in promotion_targets(store, opt.get("model_name", "ssdlite-shapes"), explicit):
        model = f"{opt.get('model_name', 'ssdlite-shapes')}.{name}"
        decision = promote(store, model, points)
        typer.echo(f"{model}: champion v{decision.champion} (previous v{decision.previous})")
        for version, reason in sorted(decision.reasons.items()):
            typer.echo(f"  v{version}: {reason}")


@track_app.command("log")
def track_log(
    engine: Path = typer.Argument(..., help="Engine directory (built here or on a build box)."),
    evaluation: Path = typer.Option(..., help="`ssdopt evaluate ENGINE --reference FP32 -o` JSON of it."),
    model_name: str | None = typer.Option(
        None, help="Registered as NAME.<target> (params: optimize.model_name)."
    ),
    promote_after: bool = typer.Option(
        True, "--promote/--no-promote", help="Run the promotion policy after."
    ),
    target: str | None = typer.Option(
        None,
        help="Register under this deployment target (params: optimize.target); default: the "
        "target of the engine's metadata.",
    ),
) -> None:
    """Register an engine with its measured evaluation under the deployment target of its metadata
    (or --target).

    The engine is not loaded (a GPU engine registers from a CPU machine); its evaluation must come from
    where it runs. Logging the same engine twice adds nothing."""
    import json
    import math

    from ssdopt.tracking import local_store, log_evaluated_engine, promote

    opt = section("optimize")
    try:
        measured = json.loads(Path(evaluation).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SsdoptError(
            evaluation, f"a readable evaluation JSON ({exc})", "run `ssdopt evaluate`"
        ) from None
    store = local_store(opt.get("mlflow_root", "mlflow"))
    run_id, registered, version = log_evaluated_engine(
        store,
        engine,
        measured,
        model_name or opt.get("model_name", "ssdlite-shapes"),
        opt.get("experiment", "ssdopt"),
        float(opt.get("map_budget", 1.0)),
        float(opt.get("min_agreement", 0.8)),
        target=target or opt.get("target"),
    )
    typer.echo(f"{registered} v{version} (run {run_id})")
    if promote_after:
        points = float(opt.get("map_budget", 1.0))
        decision = promote(store, registered, points if math.isfinite(points) else 1.0)
        typer.echo(f"{registered}: champion v{decision.champion}")
        for number, reason in sorted(decision.reasons.items()):
            typer.echo(f"  v{number}: {reason}")


@app.command("compare")
def compare_command(limit: int = typer.Option(20, help="Runs to show, newest first.")) -> None:
    """Print a comparison table of the latest MLflow runs (the key columns on a narrow terminal)."""
    from rich.console import Console
    from rich.table import Table

    from ssdopt.evaluate.report_table import COLUMNS, format_rows
    from ssdopt.tracking import compare_runs, local_store

    opt = section("optimize")
    rows = compare_runs(local_store(opt.get("mlflow_root", "mlflow")), opt.get("experiment", "ssdopt"), limit)
    console = Console()
    wide = console.width >= 120
    keys = ("mAP", "ΔmAP pts", "p50 ms", "p99 ms") if not wide else None
    titles = [title for _, title, _ in COLUMNS if wide or title in keys]
    table = Table(title="MLflow runs", show_edge=wide, pad_edge=wide)
    for title in ["run"] + (["target", *titles] if wide else ["engine @ target", "status", *titles]):
        table.add_column(title, overflow="fold")
    for row, shown in zip(rows, format_rows(rows), strict=True):
        target = row.get("target") or "–"  # runs of every target, told apart
        if wide:
            table.add_row(row["run_id"][:8], target, *(shown[t] for t in titles))
        else:  # 80 columns: backend and precision over the target in one cell, the status mark alone
            engine = f"{row.get('backend')} {row.get('precision')}\n{target}"
            table.add_row(row["run_id"][:8], engine, shown["status"][:1], *(shown[t] for t in titles))
    console.print(table)


@app.command("serve")
def serve_command(cron: str = typer.Option("0 3 * * *", help="Cron schedule of the optimize flow.")) -> None:
    """Serve the optimize flow on a schedule (needs `prefect server start`; see README)."""
    from flows.serve import serve

    serve(cron)


@app.command("summary")
def summary() -> None:
    """Print what the main job produced: dataset, calibration-set version, exported model."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ssdopt.dvcinfo import output_md5

    gen, cal, exp = section("generate"), section("calibration"), section("export")
    table = Table(title="ssdopt main job")
    table.add_column("artifact")
    table.add_column("path")
    table.add_column("details")
    rows = [
        ("dataset", Path(gen.get("out", "data/synthetic")), "dataset.json"),
        ("calibration set", Path(cal.get("out", "data/calibration")), "manifest.json"),
        ("ONNX export", Path(exp.get("out", "artifacts/onnx")), "export.json"),
    ]
    for name, path, meta_name in rows:
        meta_path = path / meta_name
        if not meta_path.exists():
            table.add_row(name, str(path), "[red]missing[/red]")
            continue
        meta = json.loads(meta_path.read_text())
        keys = ("counts", "num_images", "strategy", "model", "num_anchors", "opset")
        details = [f"{k}={meta[k]}" for k in keys if k in meta]
        if isinstance(meta.get("splits"), dict):  # images per split, not the per-class statistics
            details.append(
                " / ".join(f"{k} {v.get('images')}" for k, v in meta["splits"].items()) + " images"
            )
        md5 = output_md5(path)
        if md5:
            details.append(f"dvc md5={md5}")
        table.add_row(name, str(path), ", ".join(details))
    Console().print(table)
    report = Path(section("optimize").get("reports", "reports")) / "optimize.md"
    if report.exists():  # written by the optimize flow: engines, statuses and the champion
        typer.echo(report.read_text())


def main() -> None:
    """Entry point: usage errors and project errors exit with code 2 and a clear message."""
    try:
        app()  # standalone: click reports usage errors itself, with exit code 2
    except SsdoptError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = SsdoptError(  # writers are atomic: the partial output was already removed
            exc.filename2 or exc.filename or "the output directory",
            f"free space on its device ({exc.strerror}); nothing partial was kept",
            "free disk space or write to another --out, then rerun",
        )
        typer.secho(f"error: {full}", fg=typer.colors.RED, err=True)
        sys.exit(full.exit_code)


if __name__ == "__main__":
    main()
