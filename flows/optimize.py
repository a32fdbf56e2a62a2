"""The optimize flow: data -> calibration set -> export (DVC) -> engines in parallel -> evaluate
-> MLflow -> promotion. `make run` runs it on the embedded default (params.yaml `optimize`)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from ssdopt.backends.device import resolve_target
from ssdopt.config import load_params
from ssdopt.data.coco import resolve_split
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.engine import validation_problems
from ssdopt.evaluate.report_table import format_rows, markdown_table
from ssdopt.fileio import atomic_write
from tasks.build import build
from tasks.data import dvc_repro
from tasks.evaluate import agreement_with, evaluate
from tasks.track import log_engine, promote

DEFAULT_ENGINES = [
    {"backend": "onnxruntime", "precision": "fp32"},
    {"backend": "onnxruntime", "precision": "int8"},
    {"backend": "openvino", "precision": "fp32"},
    {"backend": "openvino", "precision": "int8"},
    {"backend": "torch-aoti", "precision": "fp32"},
]


DEVICES = ("auto", "cpu", "cuda", "all")


def cuda_present() -> bool:
    """A usable CUDA device here (torch's view: the GPU engines' runtime)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def engine_list(opt: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """The engines a run builds, each with its device: `engines` (CPU unless an entry says otherwise)
    and `gpu_engines` (CUDA). auto: the GPU list only where CUDA is present; all: both lists whatever
    this machine has (a GPU engine then fails to build, with its reason, as a ❌ row)."""
    if device not in DEVICES:
        raise SsdoptError(
            f"optimize device {device!r}", f"one of {', '.join(DEVICES)}", "fix params.yaml or --device"
        )
    cpu = [{"device": "cpu", **e} for e in opt.get("engines", DEFAULT_ENGINES)]
    gpu = [{"device": "cuda", **e} for e in opt.get("gpu_engines", [])]
    if device == "cpu":
        return [e for e in cpu if e["device"] == "cpu"]
    if device == "cuda":
        return [e for e in cpu + gpu if e["device"] == "cuda"]
    return cpu + gpu if device == "all" or cuda_present() else cpu


def _settings(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    opt = {**params.get("optimize", {}), **{k: v for k, v in overrides.items() if v is not None}}
    build_params = params.get("build", {})
    return {
        "engines": engine_list(opt, str(opt.get("device", "auto"))),
        "reference": opt.get("reference", {"backend": "onnxruntime", "precision": "fp32"}),
        "split": opt.get("split", "val"),
        "limit": int(opt.get("eval_images", 300)),
        "timing": opt.get("timing", {"warmup_s": 0.2, "min_duration_s": 2.0, "min_iterations": 100}),
        "budget": float(opt.get("map_budget", build_params.get("accuracy", {}).get("budget_points", 1.0))),
        "min_agreement": float(opt.get("min_agreement", 0.8)),
        "experiment": opt.get("experiment", "ssdopt"),
        "target": opt.get("target"),  # None: each engine's own metadata (ssdopt.backends.device)
        "model_name": opt.get("model_name", "ssdlite-shapes"),
        "engines_dir": opt.get("engines_dir", build_params.get("out", "artifacts/engines")),
        "mlflow_root": opt.get("mlflow_root", "mlflow"),
        "calibration": {
            k: v for k, v in (build_params.get("calibration") or {"directory": "data/calibration"}).items()
        },
        "onnx": build_params.get("onnx", "artifacts/onnx/model.onnx"),
        "dataset": params.get("generate", {}).get("out", "data/synthetic"),
        # the DVC stages the flow needs: data, calibration set, export (engines are built by the flow)
        "reports": opt.get("reports", "reports"),
        "stages": opt["dvc_stages"] if "dvc_stages" in opt else ["generate", "calibration", "export"],
    }


def row_target(explicit: str | None, built: dict[str, Any]) -> tuple[str, str | None]:
    """(target a built engine's row is registered under, the engine's own target where it differs).

    The run's explicit target wins, else the target the build read from the engine's metadata, else
    this machine's for the engine's device (a failed build has no metadata)."""
    own = built.get("target")
    target = resolve_target(explicit, None, built["device"]) if explicit or not own else own
    return target, (own if explicit and own and own != explicit else None)


def _write_report(path: Path, text: str) -> None:
    """The run's table and champion, for `ssdopt summary` (atomic: temp file, then rename; the temp
    name is unique so two flows of one repository never write into each other's temp file)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@flow(name="optimize", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def optimize(
    params_file: str = "params.yaml",
    engines: list[dict[str, str]] | None = None,
    eval_images: int | None = None,
    dvc_stages: list[str] | None = None,
    device: str | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """Build, evaluate, log and promote every engine of params.yaml `optimize.engines` (and
    `optimize.gpu_engines` where `device` asks for them). Each engine is registered under the
    deployment target of its own metadata (`<model_name>.cpu-amx`, `<model_name>.cuda-sm90-…`), and
    promotion runs per target, so GPU and CPU engines never compete.

    `target` (or params.yaml `optimize.target`): the deployment target to register under, which a
    work pool's deployment sets to its pool's target; it wins over the engines' metadata (an engine
    whose metadata names another target is registered anyway, with a warning and its own target in
    the run's `ssdopt.engine_target` tag). Unset: each engine's metadata, else this machine's."""
    s = _settings(
        load_params(params_file),
        {
            "engines": engines,
            "eval_images": eval_images,
            "dvc_stages": dvc_stages,
            "device": device,
            "target": target,
        },
    )
    explicit = resolve_target(s["target"]) if s["target"] is not None else None  # checked before any build
    logger = get_run_logger()
    # dvc_stages empty: data and export are given (tests, external data); nothing is reproduced.
    versions = dvc_repro(list(s["stages"])) if s["stages"] else {}

    futures = [
        build.submit(
            e["backend"],
            e["precision"],
            s["onnx"],
            s["engines_dir"],
            s["calibration"],
            e.get("threads"),
            e["device"],
            {k: e[k] for k in ("performance_hint", "int8_quantizer") if e.get(k)},
        )
        for e in s["engines"]
    ]
    built = [f.result() for f in futures]

    dataset_json, image_dir = (str(p) for p in resolve_split(Path(s["dataset"]), s["split"]))
    rows: list[dict[str, Any]] = []
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for b in built:
        row = {
            "backend": b["backend"],
            "precision": b["precision"],
            "device": b["device"],
            "batch": 1,
        }
        row["target"], engine_target = row_target(explicit, b)
        if engine_target:
            logger.warning(
                "%s %s was built for %s, registered under this run's target %s",
                b["backend"], b["precision"], engine_target, explicit,
            )  # fmt: skip
            row["engine_target"] = engine_target
        if b["status"] != "built":
            rows.append({**row, "status": "failed", "reason": b["reason"]})
            continue
        res = evaluate(
            b["engine"],
            b["engine_sha256"],
            dataset_json,
            versions.get("synthetic"),
            s["limit"],
            s["timing"],
            image_dir,
        )
        results[(b["backend"], b["precision"])] = res
        lat = res["latency"]
        size = sum(p.stat().st_size for p in Path(b["engine"]).glob("engine*")) / 1e6
        rows.append(
            {
                **row,
                "status": "built",
                "engine": b["engine"],
                "build_s": b["build_s"],
                "size_mb": size,
                "map": res["map"],
                "map_50": res["map_50"],
                "p50_ms": lat["median_ms"],
                "p90_ms": lat["p90_ms"],
                "p99_ms": lat["p99_ms"],
                "mean_ms": lat["mean_ms"],
                "throughput_ips": lat["throughput_ips"],
            }
        )

    ref_key = (s["reference"]["backend"], s["reference"]["precision"])
    reference = results.get(ref_key)
    ref_row = next(
        (r for r in rows if (r["backend"], r["precision"]) == ref_key and r["status"] == "built"), None
    )
    for row in rows:
        if row["status"] == "built" and (reference is None or ref_row is None):  # shown ❔, never ✅
            row["reason"] = f"not validated: no {' '.join(ref_key)} reference engine in this run"
            continue
        if row["status"] != "built":
            continue
        res = results[(row["backend"], row["precision"])]
        row["delta_map"] = 100.0 * (row["map"] - reference["map"])
        row["agreement"] = agreement_with(reference["detections"], res["detections"])
        if row["target"] == ref_row["target"]:  # a speed-up across devices would compare hardware
            row["speedup"] = ref_row["p50_ms"] / row["p50_ms"]
        problems = validation_problems(row["delta_map"], row["agreement"], s["budget"], s["min_agreement"])
        row["status"] = "invalid" if problems else "validated"
        if problems:
            row["reason"] = "; ".join(problems)

    common = {
        "model": "ssdlite320_mobilenet_v3_large",
        "calibration_md5": versions.get("calibration"),
        "dataset_md5": versions.get("synthetic"),
        "onnx_md5": versions.get("onnx"),
        "eval_split": s["split"],
        "eval_images": s["limit"],
    }
    try:
        for row in rows:
            if row["status"] in ("validated", "invalid"):
                meta = json.loads((Path(row["engine"]) / "metadata.json").read_text())
                params = {
                    **common,
                    "device": row["target"],
                    "backend": row["backend"],
                    "precision": row["precision"],
                    "onnx_sha256": meta["source_onnx"]["sha256"],
                    "calibration_method": (meta.get("calibration") or {}).get("method", "none"),
                    "runtime_version": (meta.get("runtime") or {}).get("version"),
                }
                registered = f"{s['model_name']}.{row['target']}"
                row.update(log_engine(row, params, registered, s["experiment"], s["mlflow_root"]))
    except SsdoptError as exc:  # tracking down after its retries: keep what was measured locally
        note = f"Not logged to MLflow: {exc}\nEngines are kept under {s['engines_dir']}."
        _write_report(Path(s["reports"]) / "optimize.md", f"{markdown_table(rows)}\n\n{note}\n")
        raise

    targets = list(dict.fromkeys(r["target"] for r in rows))  # in engine order; the first is the headline
    decisions: dict[str, dict[str, Any]] = {}
    for target in targets:
        registered = f"{s['model_name']}.{target}"
        decisions[target] = (
            promote(registered, s["budget"], s["mlflow_root"])
            if any(r.get("version") for r in rows if r["target"] == target)
            else {"model": registered, "champion": None}
        )

    table = markdown_table(rows)
    link = ""
    for target, decision in decisions.items():
        champion = _champion_row(rows, target, decision)
        if champion:
            registered = decision["model"]
            link += (
                f"\n\nChampion: **{registered}** v{champion['version']} ({champion['backend']} "
                f"{champion['precision']}), MLflow run `{champion['run_id']}` in {decision['tracking_uri']} "
                f"(`mlflow ui --backend-store-uri {decision['tracking_uri']}` → "
                f"http://127.0.0.1:5000/#/models/{registered}/versions/{champion['version']})."
            )
    create_markdown_artifact(
        key="optimize-report",
        markdown=f"# ssdopt optimize\n\n{table}{link}",
        description="Engines of this run and the promoted champion",
    )
    create_table_artifact(key="optimize-engines", table=format_rows(rows), description="Engines of this run")
    logger.info("\n%s%s", table, link)
    _write_html_report(rows, s, ", ".join(targets))
    _write_report(Path(s["reports"]) / "optimize.md", f"{table}{link}\n")
    headline = targets[0] if targets else (explicit or resolve_target(None, None, "cpu"))
    return {
        "rows": rows,
        "decision": decisions.get(headline, {"model": f"{s['model_name']}.{headline}", "champion": None}),
        "registered_model": f"{s['model_name']}.{headline}",
        "decisions": decisions,
    }


def _champion_row(rows: list[dict[str, Any]], target: str, decision: dict[str, Any]) -> dict[str, Any] | None:
    """The row of this run that holds `target`'s champion version (None: the champion is older)."""
    champion = decision.get("champion")
    return next(
        (r for r in rows if r["target"] == target and champion and r.get("version") == champion), None
    )


def _write_html_report(rows: list[dict[str, Any]], s: dict[str, Any], target: str) -> None:
    """reports/index.html (+ bench.json/.md, pareto.png) of this run, the page `ssdopt report` renders."""
    import datetime
    import platform

    from ssdopt.backends.device import cpu_info
    from ssdopt.evaluate.bench_output import write_bench_outputs
    from ssdopt.evaluate.report import write_report
    from ssdopt.evaluate.report_table import STATUS, STATUS_WORDS, bench_rows

    context = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_info(), "platform": platform.platform()},
        "command": "make run (Prefect flow optimize)",
        "model": f"{s['model_name']} ({s['onnx']}), target {target}",
        "dataset": s["dataset"],
        "images": s["limit"],
        "batch": 1,
        "plan": s["timing"],
        "budget_points": s["budget"],
        "min_agreement": s["min_agreement"],
        "speedup_baseline": " ".join(s["reference"].values()),
        "legend": {STATUS[k]: v for k, v in STATUS_WORDS.items() if k != "built"}
        | {"❔": STATUS_WORDS["built"]},
    }
    reports = Path(s["reports"])
    write_bench_outputs(bench_rows(rows, "fused SSDDecodeNMS"), reports, context)
    write_report(reports)


def _offline_prefect() -> AbstractContextManager[Any]:
    """Prefect settings for `make run` where the environment does not set them: no analytics (no
    network), and 120 s rather than 20 s for the temporary server to start (its first start migrates
    a fresh database; on a busy 2-core machine, or with two flows starting at once, 20 s was seen to
    fail). Prefect reads its environment at import, so these are applied as temporary settings."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    defaults = {
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
    }
    return temporary_settings(updates={k: v for k, v in defaults.items() if k.name not in os.environ})


def _start_prefect_api() -> None:
    """Reach the Prefect API before the flow starts; a temporary server is started (and on first use
    migrates PREFECT_HOME's database) under a lock file there: two flows started at once on one
    repository otherwise race on that migration ("table deployment_version already exists" from one
    of the two servers was seen). The server lives until this process exits."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".ssdopt-server-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the holder dies
        with get_client(sync_client=True) as client:
            client.hello()


def main() -> None:
    """`make run`: the flow, then its table and champion on stdout (flushed: Prefect's temporary
    server exits the interpreter hard, which would drop buffered output)."""
    try:
        with _offline_prefect():
            _start_prefect_api()
            result = optimize()
    except SsdoptError as exc:  # e.g. the tracking server stayed down through every retry
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    print(markdown_table(result["rows"]), flush=True)
    for target, decision in result["decisions"].items():
        champion = decision.get("champion")
        line = (
            f"champion of {decision['model']}: v{champion}"
            if champion
            else f"{decision['model']}: no champion"
        )
        row = _champion_row(result["rows"], target, decision)
        if row:
            line += f" ({row['backend']} {row['precision']}, p99 {row['p99_ms']:.2f} ms"
            line += f", mAP {row['map']:.4f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
