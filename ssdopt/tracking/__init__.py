"""MLflow tracking, the engine model registry and promotion: the one place ssdopt imports MLflow.

Local default: SQLite under mlflow/ and artifacts under mlflow/artifacts/, by absolute URI
(MLflow otherwise writes ./mlflow.db wherever it is run). MLFLOW_TRACKING_URI overrides it.

Faults: logging and promotion hold a file lock beside the store (two flows on one machine never
log the same engine twice, nor race SQLite's first migration); a run left RUNNING by a killed
process is marked KILLED and logged again; a version is registered only after its run finished,
so a registry version never points at a half-logged run. An unreachable or refusing server is
retried a bounded number of times (MLflow's default is ~4 minutes per request), then reported as
one SsdoptError with the tracking URI's credentials redacted (the store, its client, lock and
error mapping: ssdopt.tracking.store).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssdopt.errors import SsdoptError
from ssdopt.tracking.promotion import Candidate, Decision, decide
from ssdopt.tracking.store import (
    Store,
    exclusive,
    existing_store,
    experiment_id,
    local_store,
    mlflow_client,
    redact_uri,
    server_errors,
)

__all__ = [  # the tracking API; the store's part lives in ssdopt.tracking.store
    "CHAMPION",
    "PREVIOUS",
    "LOGGED_METRICS",
    "WRITER_TAG",
    "Candidate",
    "Decision",
    "Store",
    "existing_store",
    "experiment_id",
    "local_store",
    "redact_uri",
    "log_engine_run",
    "engine_signature",
    "version_tags",
    "log_engine_once",
    "candidates",
    "promote",
    "registered_targets",
    "promotion_targets",
    "compare_runs",
    "resolve_engine_uri",
    "log_evaluated_engine",
]

ENGINE_MODEL_CODE = Path(__file__).with_name("engine_model.py")
CHAMPION, PREVIOUS = "champion", "previous"
LOGGED_METRICS = (
    "map",
    "map_50",
    "delta_map",
    "agreement",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "throughput_ips",
    "speedup",
    "size_mb",
    "build_s",
)


WRITER_TAG = "ssdopt.writer"  # host:pid of the process that logged a run (to find runs it left RUNNING)


def log_engine_run(
    store: Store,
    experiment: str,
    engine_dir: Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Mapping[str, Path] | None = None,
    registered_model: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> tuple[str, str | None]:
    """Log one engine: params, metrics, artifacts and the engine as a pyfunc model.

    Returns (run_id, registered model version or None). The model is logged from code
    (tracking/engine_model.py) with the engine directory as its artifact: no pickle. It is
    registered after the run finished, so no version ever points at a run that a crash cut short.
    """
    import json

    import mlflow

    engine_dir = Path(engine_dir)
    if not (engine_dir / "metadata.json").is_file():
        raise SsdoptError(engine_dir, "an engine directory with metadata.json", "build it: `ssdopt build`")
    mlflow_client(store)
    exp_id = experiment_id(store, experiment)
    tags = {**(tags or {}), WRITER_TAG: f"{socket.gethostname()}:{os.getpid()}"}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        finite = {k: float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
        mlflow.log_metrics(finite)
        for name, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=name)
        with warnings.catch_warnings():  # the signature is explicit; an example would only rerun the engine
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="engine",
                python_model=str(ENGINE_MODEL_CODE),
                artifacts={"engine": str(engine_dir)},
                pip_requirements=["ssdopt"],
                signature=engine_signature(json.loads((engine_dir / "metadata.json").read_text())),
            )
        mlflow.set_tag("ssdopt.model_id", info.model_id)
    version = (
        _register(store, run.info.run_id, info.model_id, registered_model, engine_dir)
        if registered_model
        else None
    )
    return run.info.run_id, version


def engine_signature(metadata: Mapping[str, Any]):  # noqa: ANN201 - mlflow type kept out of the signature
    """The engine model's signature: a float32 [B, 3, H, W] batch in, fixed-size detections out (the
    runner checks the exact shape; -1 where the engine takes any size)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = [d if isinstance(d, int) else -1 for d in (metadata.get("input") or {}).get("shape", [])]
    images = tuple([-1, *shape[1:]]) if len(shape) == 4 else (-1, 3, -1, -1)
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    outputs = [
        TensorSpec(i32, (-1,), "num_detections"),
        TensorSpec(f32, (-1, -1, 4), "boxes"),
        TensorSpec(f32, (-1, -1), "scores"),
        TensorSpec(i32, (-1, -1), "labels"),
    ]
    return ModelSignature(inputs=Schema([TensorSpec(f32, images)]), outputs=Schema(outputs))


def version_tags(engine_dir: Path) -> tuple[dict[str, str], str]:
    """Tags and description of a registry version, from its engine's metadata: what a reader of the
    registry wants without opening the run (backend, precision, target, source graph)."""
    import json

    from ssdopt.backends.device import target_of

    meta = json.loads((Path(engine_dir) / "metadata.json").read_text())
    target = target_of(meta.get("device") or {})
    runtime = meta.get("runtime") or {}
    tags = {
        "backend": str(meta.get("backend")),
        "precision": str(meta.get("precision")),
        "target": target,
        "runtime_version": str(runtime.get("version")),
        "engine_sha256": str((meta.get("engine") or {}).get("sha256")),
    }
    onnx_sha = (meta.get("source_onnx") or {}).get("sha256") or "?"
    device = (meta.get("device") or {}).get("name")
    description = (
        f"{tags['backend']} {tags['precision']} engine for {target} ({device}), "
        f"{tags['backend']} {tags['runtime_version']}, built {meta.get('built_at', '?')} from ONNX "
        f"sha256 {onnx_sha[:16]}"
    )
    return tags, description


def _register(
    store: Store, run_id: str, model_id: str, registered_model: str, engine_dir: Path | None = None
) -> str:
    """Register the logged model `model_id` of the finished run `run_id`; returns the version.

    mlflow.register_model prints "Created version ..." to stderr per call: captured here (the caller
    reports the version), and written out only if registration fails."""
    import contextlib
    import io
    import sys

    import mlflow

    client = mlflow_client(store)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter):
            version = str(mlflow.register_model(f"models:/{model_id}", registered_model).version)
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise
    _tag_version(client, registered_model, version, run_id, engine_dir)
    return version


def _tag_version(client: Any, model: str, version: str, run_id: str, engine_dir: Path | None) -> None:
    """The version's tags and description (idempotent: a rerun completes what a fault cut short)."""
    client.set_model_version_tag(model, version, "run_id", run_id)
    if engine_dir is not None and (Path(engine_dir) / "metadata.json").is_file():
        tags, description = version_tags(Path(engine_dir))
        for key, value in tags.items():
            client.set_model_version_tag(model, version, key, value)
        client.update_model_version(model, version, description=description)


def _left_running(run: Any) -> bool:
    """A RUNNING run whose writer (on this machine) is gone, or is this process outside any run.

    Called with the store lock held: no live writer of this machine can be inside log_engine_run.
    """
    host, _, pid = run.data.tags.get(WRITER_TAG, "").rpartition(":")
    if run.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@server_errors
def log_engine_once(store: Store, experiment: str, engine_dir: Path, **kwargs: Any) -> tuple[str, str | None]:
    """log_engine_run unless this engine (by sha256) already has a finished run and version.

    A rerun of the flow with nothing changed therefore adds no run and no registry version; a rerun
    after a crash finishes the job: a finished run without its version gets registered, a run left
    RUNNING by a killed process is marked KILLED and the engine logged again.
    """
    import json

    engine_dir = Path(engine_dir)
    sha = json.loads((engine_dir / "metadata.json").read_text())["engine"]["sha256"]
    model = kwargs.get("registered_model")
    with exclusive(store):
        client = mlflow_client(store)
        exp_id = experiment_id(store, experiment)
        runs = client.search_runs([exp_id], filter_string=f"tags.`ssdopt.engine_sha256` = '{sha}'")
        for run in runs:
            if _left_running(run):
                client.set_tag(run.info.run_id, "ssdopt.superseded", "left RUNNING by a killed process")
                client.set_terminated(run.info.run_id, "KILLED")
        for run in (r for r in runs if r.info.status == "FINISHED"):
            if model is None:
                return run.info.run_id, None
            for mv in client.search_model_versions(f"name='{model}' and run_id='{run.info.run_id}'"):
                if "engine_sha256" not in (mv.tags or {}):  # the server failed between version and tags
                    _tag_version(client, model, str(mv.version), run.info.run_id, engine_dir)
                return run.info.run_id, str(mv.version)
            model_id = run.data.tags.get("ssdopt.model_id")
            if model_id:  # the process died between the run's end and its registration
                return run.info.run_id, _register(store, run.info.run_id, model_id, model, engine_dir)
        tags = {**(kwargs.pop("tags", None) or {}), "ssdopt.engine_sha256": sha}
        return log_engine_run(store, experiment, engine_dir, tags=tags, **kwargs)


@server_errors
def candidates(store: Store, registered_model: str) -> tuple[list[Candidate], str | None]:
    """Every version of `registered_model` with its run's metrics, and the current champion."""
    client = mlflow_client(store)
    try:
        current = str(client.get_model_version_by_alias(registered_model, CHAMPION).version)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the alias is absent
        current = None
    found = []
    for mv in client.search_model_versions(f"name='{registered_model}'"):
        run = client.get_run(mv.run_id) if mv.run_id else None
        m = run.data.metrics if run else {}
        t = run.data.tags if run else {}
        found.append(
            Candidate(
                version=str(mv.version),
                target=t.get("ssdopt.target", registered_model),
                p99_ms=m.get("p99_ms"),
                delta_map=m.get("delta_map"),
                validated=t.get("ssdopt.validated", "true") == "true",
            )
        )
    return found, current


@server_errors
def promote(store: Store, registered_model: str, budget: float = 1.0) -> Decision:
    """Apply the promotion policy to one registered model (one deployment target)."""
    with exclusive(store):
        return _promote(store, registered_model, budget)


def _promote(store: Store, registered_model: str, budget: float) -> Decision:
    client = mlflow_client(store)
    pool, current = candidates(store, registered_model)
    if not pool:
        raise SsdoptError(registered_model, "a registered model with versions", "run the optimize flow first")
    decision = decide(pool, current, budget)
    if decision.changed and decision.champion is not None:
        client.set_registered_model_alias(registered_model, CHAMPION, decision.champion)
        if decision.previous is not None:
            client.set_registered_model_alias(registered_model, PREVIOUS, decision.previous)
    for version, reason in decision.reasons.items():
        client.set_model_version_tag(registered_model, version, "promotion", reason)
    if decision.champion is not None:
        client.set_model_version_tag(registered_model, decision.champion, "promotion", "champion")
    return decision


@server_errors
def registered_targets(store: Store, model_name: str) -> list[str]:
    """The targets with a registered model `<model_name>.<target>` in the store, sorted."""
    client = mlflow_client(store)
    prefix = f"{model_name}."
    quoted = prefix.replace("'", "''")
    found = client.search_registered_models(filter_string=f"name LIKE '{quoted}%'", max_results=1000)
    # startswith: LIKE reads a '_' of the name as a wildcard
    return sorted(m.name[len(prefix) :] for m in found if m.name.startswith(prefix))


def promotion_targets(store: Store, model_name: str, explicit: list[str] | None = None) -> list[str]:
    """The targets to promote, the flows' and the CLI's one rule (ssdopt.backends.device.resolve_target):
    `explicit` (the promote flow's `targets`, `ssdopt promote --target`, params.yaml optimize.target)
    wins; else every target that has registered engines (each registered under the target of its
    engine's metadata, or its run's `target`); else this machine's (none registered yet)."""
    from ssdopt.backends.device import local_targets, resolve_target

    if explicit:
        return [resolve_target(t) for t in explicit]
    return registered_targets(store, model_name) or local_targets()


@server_errors
def compare_runs(store: Store, experiment: str, limit: int = 50) -> list[dict[str, Any]]:
    """The latest runs of `experiment` with their params and metrics, newest first."""
    client = mlflow_client(store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SsdoptError(
            f"MLflow experiment '{experiment}'", "an existing experiment", "run `make run` first"
        )
    rows = []
    for run in client.search_runs(
        [found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
    ):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            {
                "run_id": run.info.run_id,
                "backend": p.get("backend"),
                "precision": p.get("precision"),
                "target": t.get("ssdopt.target"),
                "status": "validated" if t.get("ssdopt.validated") == "true" else "invalid",
                **{k: m.get(k) for k in LOGGED_METRICS},
            }
        )
    return rows


def resolve_engine_uri(uri: str, store: Store | None = None) -> Path:
    """models:/NAME@ALIAS (or models:/NAME/VERSION) -> a local copy of the logged engine directory."""
    import mlflow

    store = store or existing_store()
    mlflow_client(store)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown models/aliases
        raise SsdoptError(
            uri, f"a registered engine in {store.tracking_uri} ({exc})", "check the name and alias"
        ) from exc
    found = sorted(p.parent for p in local.rglob("metadata.json") if (p.parent / "layers.json").is_file())
    if not found:
        raise SsdoptError(
            uri, "a logged ssdopt engine (metadata.json + layers.json)", "log engines with the flow"
        )
    return found[0]


def log_evaluated_engine(
    store: Store,
    engine_dir: Path,
    evaluation: Mapping[str, Any],
    model_name: str,
    experiment: str = "ssdopt",
    budget_points: float = 1.0,
    min_agreement: float = 0.8,
    target: str | None = None,
) -> tuple[str, str, str]:
    """Log a built engine with the evaluation measured where it runs (`ssdopt evaluate` JSON) and
    register it under `<model_name>.<target>`, the target read from the engine's own metadata (so a
    GPU engine from a build box lands in its GPU model, never among CPU engines). Nothing is loaded:
    this machine may not be able to run the engine. An explicit `target` wins over the metadata's
    (ssdopt.backends.device.resolve_target). Returns (run_id, registered model, version)."""
    import json

    from ssdopt.backends.device import resolve_target, target_of
    from ssdopt.evaluate.engine import validation_problems

    engine_dir = Path(engine_dir)
    meta_path = engine_dir / "metadata.json"
    if not meta_path.is_file():
        raise SsdoptError(engine_dir, "an engine directory with metadata.json", "pass the engine directory")
    meta = json.loads(meta_path.read_text())
    if "map" not in evaluation:
        raise SsdoptError(
            "--evaluation", "the JSON `ssdopt evaluate` writes (with map)", "run `ssdopt evaluate ENGINE`"
        )
    own = target_of(meta.get("device") or {})
    target = resolve_target(target) if target is not None else own
    registered = f"{model_name}.{target}"
    problems = validation_problems(
        evaluation.get("delta_map"), evaluation.get("agreement"), budget_points, min_agreement
    )
    params = {
        "backend": meta.get("backend"),
        "precision": meta.get("precision"),
        "device": target,
        "onnx_sha256": (meta.get("source_onnx") or {}).get("sha256"),
        "runtime_version": (meta.get("runtime") or {}).get("version"),
        "eval_dataset": evaluation.get("dataset"),
        "dataset_md5": evaluation.get("dataset_md5"),
        "calibration_md5": (meta.get("calibration") or {}).get("dvc_md5"),
        "calibration_manifest_sha256": (meta.get("calibration") or {}).get("manifest_sha256"),
        "eval_images": evaluation.get("images"),
    }
    tags = {
        "ssdopt.target": target,
        "ssdopt.validated": str("delta_map" in evaluation and not problems).lower(),
        "ssdopt.measured_on": json.dumps(evaluation.get("measured_on", {}))[:4000],
    }
    if problems:
        tags["ssdopt.reason"] = "; ".join(problems)
    if own != target:  # registered under an explicit target: the engine's own is kept beside it
        tags["ssdopt.engine_target"] = own
    run_id, version = log_engine_once(
        store,
        experiment,
        engine_dir,
        params={k: v for k, v in params.items() if v is not None},
        metrics={k: evaluation.get(k) for k in LOGGED_METRICS if isinstance(evaluation.get(k), int | float)},
        registered_model=registered,
        tags=tags,
        run_name=f"{meta.get('backend')}-{meta.get('precision')}-{target}",
    )
    return run_id, registered, str(version)
