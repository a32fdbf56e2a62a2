"""MLflow tracking, the engine model registry and promotion: the one place ssdopt imports MLflow.

Local default: SQLite under mlflow/ and artifacts under mlflow/artifacts/, by absolute URI
(MLflow otherwise writes ./mlflow.db wherever it is run). MLFLOW_TRACKING_URI overrides it.

Faults: logging and promotion hold a file lock beside the store (two flows on one machine never
log the same engine twice, nor race SQLite's first migration); a run left RUNNING by a killed
process is marked KILLED and logged again; a version is registered only after its run finished,
so a registry version never points at a half-logged run. An unreachable or refusing server is
retried a bounded number of times (MLflow's default is ~4 minutes per request), then reported as
one SsdoptError with the tracking URI's credentials redacted.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


# Bounded HTTP retries against a tracking server (MLflow's defaults: 7 retries, backoff factor 2,
# about 4 minutes per request). Set only when the user has not set them.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# "1": experiments keep artifacts in the tracking server's store (`--artifacts-destination`, S3 for
# a team; `make infra-up` exports it), not under a client-side path
SERVER_ARTIFACTS = "SSDOPT_SERVER_ARTIFACTS"
WRITER_TAG = "ssdopt.writer"  # host:pid of the process that logged a run (to find runs it left RUNNING)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_root: str
    lock_file: Path | None = None  # serialises logging/promotion of the processes of this machine


def local_store(root: Path | str = "mlflow") -> Store:
    """The store to use: $MLFLOW_TRACKING_URI if set, else SQLite under `root` (absolute)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    lock = root / ".ssdopt-tracking.lock"
    if uri and os.environ.get(SERVER_ARTIFACTS) == "1":  # a team's server: its artifact store (S3)
        return Store(uri, "", lock)
    if uri:
        return Store(uri, (root / "artifacts").as_uri(), lock)
    root.mkdir(parents=True, exist_ok=True)
    return Store(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri(), lock)


def existing_store(root: Path | str | None = None) -> Store:
    """local_store for reading: $MLFLOW_TRACKING_URI, or the SQLite store under `root` (params.yaml
    optimize.mlflow_root) that must exist already. Reading from another directory must not create an
    empty store there and then report that the model is not registered."""
    from ssdopt.config import section

    root = Path(root if root is not None else section("optimize").get("mlflow_root", "mlflow")).resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (root / "mlflow.db").is_file():
        raise SsdoptError(
            root / "mlflow.db",
            "an MLflow store with the registered engines",
            "run from the project directory that ran the optimize flow (or `make run`), or set "
            "MLFLOW_TRACKING_URI to the tracking server",
        )
    return local_store(root)


def redact_uri(text: str) -> str:
    """`text` with the password of every scheme://user:password@host replaced by ***."""
    return re.sub(r"(\w+://[^/\s:@]+):[^/\s@]+@", r"\1:***@", text)


def _unreachable(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) says the server could not be reached, or went away in the
    middle of a response (a killed server: "Connection broken: IncompleteRead")."""
    import requests

    lost = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, lost):
            return True
        seen = seen.__cause__ or seen.__context__
    hints = (
        "Max retries exceeded",
        "Connection refused",
        "Connection broken",
        "Connection aborted",
        "timeout",
    )
    return any(s in str(exc) for s in hints)


def _refused(exc: BaseException) -> bool:
    """True for an authentication / permission refusal by the server (HTTP 401/403)."""
    code = str(getattr(exc, "error_code", ""))
    return code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or any(
        s in str(exc) for s in ("401", "403", "You are not authenticated", "Permission denied")
    )


def _server_errors(func: Callable[..., _T]) -> Callable[..., _T]:
    """Turn an unreachable or refusing tracking server, or a full disk, into one SsdoptError (the
    function's first argument is the Store).

    The Prefect tasks retry it; the message names the server, never its credentials.
    """

    @functools.wraps(func)
    def wrapper(store: Store, *args: Any, **kwargs: Any) -> _T:
        try:
            return func(store, *args, **kwargs)
        except SsdoptError:
            raise
        except Exception as exc:
            where = f"MLflow tracking server {redact_uri(store.tracking_uri)}"
            reason = redact_uri(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
            if "/mlflow-artifacts/" in str(exc):  # the server is up; its artifact store (S3) is not
                raise SsdoptError(
                    f"the artifact store behind {where} (its --artifacts-destination)",
                    f"uploads proxied through the server to succeed ({reason[:160]})",
                    "start the S3-compatible store, or fix the server's MLFLOW_S3_ENDPOINT_URL and "
                    "credentials, then rerun: the engine is kept on disk, the cut-short run is marked "
                    "FAILED and no registry version points at it",
                ) from None
            # 503: MLflow's answer when its database refuses (TEMPORARILY_UNAVAILABLE)
            if re.search(r"too many 503 error responses|TEMPORARILY_UNAVAILABLE", str(exc)):
                retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
                code = "503"
                raise SsdoptError(
                    f"the database behind {where} (its --backend-store-uri: PostgreSQL for a team)",
                    f"a database that answers (the server answered HTTP {code} to each request, "
                    f"retried up to {retries} times)",
                    "start the tracking server's database (`pg_ctl start` on the team's PostgreSQL; "
                    "here `make infra-up`) or see the tracking server's log, then rerun: the engine is "
                    "kept on disk, no registry version is made without its finished run and "
                    "artifacts, and the rerun registers a run that finished once",
                ) from None
            if _unreachable(exc):
                retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
                cause = re.search(
                    r"\[Errno -?\d+\][^'\")]*|Connection broken[^'\"]*|Read timed out", str(exc)
                )
                reason = cause.group(0).strip() if cause else reason
                raise SsdoptError(
                    where,
                    f"a reachable server (each request retried up to {retries} times: {reason})",
                    "start the server or fix MLFLOW_TRACKING_URI, then rerun; built engines are kept "
                    "on disk and reused, and nothing already logged is logged twice",
                ) from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SsdoptError(
                    exc.filename2 or exc.filename or store.artifact_root or store.tracking_uri,
                    f"free space for the run's artifacts ({exc.strerror})",
                    "free disk space and rerun: the cut-short run is marked FAILED and the engine is "
                    "logged again",
                ) from exc
            if _refused(exc):
                raise SsdoptError(
                    where,
                    f"credentials it accepts ({reason})",
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD of a user with "
                    "permission on the experiment and the registered model",
                ) from None
            raise

    return wrapper


@contextmanager
def _exclusive(store: Store) -> Iterator[None]:
    """Hold the store's lock file (flock: released by the kernel even when the holder is killed)."""
    if store.lock_file is None:
        yield
        return
    store.lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(store.lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(store: Store):  # noqa: ANN202 - mlflow type kept out of the signature
    # MLflow draws a "Downloading artifacts" bar per logged model (it reads the model back to validate
    # it): noise between our own progress bars and the table. The user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow

    # "Creating initial MLflow database tables..." and friends: INFO chatter on every fresh store
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

    if store.tracking_uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return mlflow.MlflowClient(store.tracking_uri, store.tracking_uri)


def experiment_id(store: Store, name: str) -> str:
    """Create the experiment (artifacts under the store's artifact root) or return it."""
    client = _client(store)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # a tracking server keeps artifacts where its --artifacts-destination says (S3 for a team's
    # server): a client-side file path would put them on this machine's disk, out of the team's reach
    location = f"{store.artifact_root}/{name}" if store.artifact_root else None
    return client.create_experiment(name, artifact_location=location)


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
    _client(store)
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

    client = _client(store)
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


@_server_errors
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
    with _exclusive(store):
        client = _client(store)
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


@_server_errors
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


@_server_errors
def promote(store: Store, registered_model: str, budget: float = 1.0) -> Decision:
    """Apply the promotion policy to one registered model (one deployment target)."""
    with _exclusive(store):
        return _promote(store, registered_model, budget)


def _promote(store: Store, registered_model: str, budget: float) -> Decision:
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


@_server_errors
def registered_targets(store: Store, model_name: str) -> list[str]:
    """The targets with a registered model `<model_name>.<target>` in the store, sorted."""
    client = _client(store)
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


@_server_errors
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

    store = store or existing_store()
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
