"""MLflow tracking, the engine model registry and promotion: the one place ssdopt imports MLflow.

Local default: SQLite under mlflow/ and artifacts under mlflow/artifacts/, by absolute URI
(MLflow otherwise writes ./mlflow.db wherever it is run). MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssdopt.errors import SsdoptError
from ssdopt.tracking.promotion import Candidate, Decision, decide

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


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_root: str


def local_store(root: Path | str = "mlflow") -> Store:
    """The store to use: $MLFLOW_TRACKING_URI if set, else SQLite under `root` (absolute)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Store(uri, (root / "artifacts").as_uri())
    root.mkdir(parents=True, exist_ok=True)
    return Store(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri())


def _client(store: Store):  # noqa: ANN202 - mlflow type kept out of the signature
    import mlflow

    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return mlflow.MlflowClient(store.tracking_uri, store.tracking_uri)


def experiment_id(store: Store, name: str) -> str:
    """Create the experiment (artifacts under the store's artifact root) or return it."""
    client = _client(store)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=f"{store.artifact_root}/{name}")


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
    (tracking/engine_model.py) with the engine directory as its artifact: no pickle.
    """
    import mlflow

    engine_dir = Path(engine_dir)
    if not (engine_dir / "metadata.json").is_file():
        raise SsdoptError(engine_dir, "an engine directory with metadata.json", "build it: `ssdopt build`")
    _client(store)
    exp_id = experiment_id(store, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags or {})) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        finite = {k: float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
        mlflow.log_metrics(finite)
        for name, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=name)
        info = mlflow.pyfunc.log_model(
            name="engine",
            python_model=str(ENGINE_MODEL_CODE),
            artifacts={"engine": str(engine_dir)},
            registered_model_name=registered_model,
            pip_requirements=["ssdopt"],
        )
        version = None
        if registered_model:
            version = str(info.registered_model_version)
            client = _client(store)
            client.set_model_version_tag(registered_model, version, "run_id", run.info.run_id)
        return run.info.run_id, version


def log_engine_once(store: Store, experiment: str, engine_dir: Path, **kwargs: Any) -> tuple[str, str | None]:
    """log_engine_run unless this engine (by sha256) already has a finished run and version.

    A rerun of the flow with nothing changed therefore adds no run and no registry version.
    """
    import json

    engine_dir = Path(engine_dir)
    sha = json.loads((engine_dir / "metadata.json").read_text())["engine"]["sha256"]
    client = _client(store)
    exp_id = experiment_id(store, experiment)
    model = kwargs.get("registered_model")
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`ssdopt.engine_sha256` = '{sha}' and attributes.status = 'FINISHED'"
    )
    for run in runs:
        if model is None:
            return run.info.run_id, None
        for mv in client.search_model_versions(f"name='{model}' and run_id='{run.info.run_id}'"):
            return run.info.run_id, str(mv.version)
    tags = {**(kwargs.pop("tags", None) or {}), "ssdopt.engine_sha256": sha}
    return log_engine_run(store, experiment, engine_dir, tags=tags, **kwargs)


def candidates(store: Store, registered_model: str) -> tuple[list[Candidate], str | None]:
    """Every version of `registered_model` with its run's metrics, and the current champion."""
    client = _client(store)
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


def promote(store: Store, registered_model: str, budget: float = 1.0) -> Decision:
    """Apply the promotion policy to one registered model (one deployment target)."""
    client = _client(store)
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


def compare_runs(store: Store, experiment: str, limit: int = 50) -> list[dict[str, Any]]:
    """The latest runs of `experiment` with their params and metrics, newest first."""
    client = _client(store)
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

    store = store or local_store()
    _client(store)
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
