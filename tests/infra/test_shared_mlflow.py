"""A team's shared MLflow, for real: PostgreSQL backend store, moto S3 artifacts, basic auth, all on
loopback, started by ssdopt.infra (the code behind `make infra-up`). Engines are the tiny model's.

- an engine is logged, registered, promoted and loaded back as models:/NAME@champion through the
  server, its artifacts in the S3 bucket; logging it again adds no run and no version;
- `ssdopt compare` reads the runs of two deployment targets from the shared server, told apart;
- the S3 store down while logging: one clear error naming the artifact store, the engine kept on
  disk, no registry version for it;
- PostgreSQL restarted while an engine is logged: the requests the server answers 503 meanwhile are
  retried (bounded), the engine is logged and registered once, its version loads;
- PostgreSQL down while a version is registered: after the bounded retries one clear error naming the
  database behind the server and the fix, no version; the rerun registers the finished run once;
- no credential (PostgreSQL, S3, MLflow admin) in the servers' logs, the runs' params and tags, the
  registry or the artifacts (after the faults above, so their server logs are searched too).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from ssdopt.errors import SsdoptError
from ssdopt.infra import Infra, stop_group


@pytest.fixture()
def as_team(infra: Infra, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Infra:
    for name, value in infra.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # the client never talks to S3
    monkeypatch.chdir(tmp_path)
    return infra


@pytest.fixture(scope="module")
def engines(tiny_export, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ssdopt.build import build_engine

    out = tmp_path_factory.mktemp("engines")
    return {
        backend: build_engine(backend, "fp32", tiny_export.model, out).path
        for backend in ("onnxruntime", "openvino")
    }


def _target(engine: Path) -> str:
    from ssdopt.backends.device import target_of

    return target_of(json.loads((engine / "metadata.json").read_text())["device"])


def _log(
    engine: Path, tmp_path: Path, model: str = "tiny-team", target: str | None = None
) -> tuple[str, str | None]:
    from ssdopt import tracking

    target = target or _target(engine)
    return tracking.log_engine_once(
        tracking.local_store(tmp_path / "mlflow"),
        "team",
        engine,
        params={"backend": engine.name.split("-")[0], "precision": "fp32", "device": target},
        metrics={"p99_ms": 1.0, "delta_map": 0.0, "map": 0.5},
        registered_model=f"{model}.{target}",
        tags={"ssdopt.target": target, "ssdopt.validated": "true"},
        run_name=engine.name,
    )


def test_log_register_promote_and_load_champion(as_team: Infra, engines, tmp_path: Path) -> None:
    from ssdopt import tracking

    engine = engines["onnxruntime"]
    run_id, version = _log(engine, tmp_path)
    assert (run_id, version) == _log(engine, tmp_path), "a second log of the same engine added a run"
    model = f"tiny-team.{_target(engine)}"
    store = tracking.local_store(tmp_path / "mlflow")
    assert tracking.promote(store, model).champion == version
    local = tracking.resolve_engine_uri(f"models:/{model}@champion", store)
    assert json.loads((local / "metadata.json").read_text()) == json.loads(
        (engine / "metadata.json").read_text()
    )
    keys = as_team.s3_objects()
    assert any(k.endswith("metadata.json") for k in keys), keys  # the artifacts live in the bucket
    assert not (tmp_path / "mlflow" / "artifacts").exists()  # and not on the client's disk


def test_compare_reads_the_shared_server(
    as_team: Infra, engines, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of two deployment targets (this CPU's and a GPU build box's) side by side, told apart."""
    import sys

    from ssdopt.cli import main

    gpu = "cuda-sm90-nvidia-h200"
    _log(engines["onnxruntime"], tmp_path)
    _log(_new_engine(engines["onnxruntime"], tmp_path / "onnxruntime-gpu-box"), tmp_path, target=gpu)
    monkeypatch.setenv("COLUMNS", "200")  # one line per run: the targets are not folded
    (tmp_path / "params.yaml").write_text(
        f"optimize:\n  experiment: team\n  mlflow_root: {tmp_path}/mlflow\n"
    )
    sys.argv = ["ssdopt", "compare"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    out = capsys.readouterr().out
    lines = {
        target: [ln for ln in out.splitlines() if f" {target} " in ln]
        for target in (_target(engines["onnxruntime"]), gpu)
    }
    assert lines[gpu] and len(lines[gpu]) == 1 and lines[_target(engines["onnxruntime"])], out
    assert "onnxruntime" in lines[_target(engines["onnxruntime"])][0], out
    assert "onnxruntime" in lines[gpu][0] and "0.5000" in lines[gpu][0], out


def test_s3_down_while_logging(as_team: Infra, engines, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    engine = engines["openvino"]
    stop_group(as_team.pids.pop("s3"))
    try:
        with pytest.raises(SsdoptError) as info:
            _log(engine, tmp_path)
    finally:
        as_team.start_s3()
    message = str(info.value)
    print(f"observed: {message}")
    assert "artifact store" in message and "Fix:" in message, message
    assert all(s not in message for s in as_team.secrets())
    assert (engine / "metadata.json").is_file()  # the engine is kept on disk
    model = f"tiny-team.{_target(engine)}"
    client = MlflowClient(as_team.mlflow_url, as_team.mlflow_url)
    sha = json.loads((engine / "metadata.json").read_text())["engine"]["sha256"]
    runs = client.search_runs(
        [client.get_experiment_by_name("team").experiment_id], f"tags.`ssdopt.engine_sha256` = '{sha}'"
    )
    assert runs and all(r.info.status != "FINISHED" for r in runs)
    for mv in client.search_model_versions(f"name='{model}'"):
        assert mv.run_id not in {r.info.run_id for r in runs}, "a version was registered without artifacts"
    # with the store back, the rerun completes with one version
    run_id, version = _log(engine, tmp_path)
    mine = [mv.version for mv in client.search_model_versions(f"name='{model}' and run_id='{run_id}'")]
    assert mine == [version], mine  # the engine shares its target's model with the ORT engine


def _new_engine(engine: Path, out: Path) -> Path:
    """A copy of `engine` with bytes and a sha256 of its own: an engine the registry has not seen."""
    import onnx

    from ssdopt.fileio import sha256_file

    shutil.copytree(engine, out)
    model = onnx.load(str(out / "engine.onnx"))
    model.doc_string = f"variant {out.name}"
    onnx.save(model, str(out / "engine.onnx"))
    meta = json.loads((out / "metadata.json").read_text())
    meta["engine"]["sha256"] = sha256_file(out / "engine.onnx")
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def _refusals(infra: Infra) -> int:
    """The database errors (OperationalError lines) in the MLflow server's log so far."""
    return (infra.path / "mlflow" / "server.log").read_text(errors="replace").count("OperationalError")


def _complete_versions(infra: Infra, tmp_path: Path, model: str) -> list[str]:
    """Every version of `model`, each checked whole: its run FINISHED, its tags, its engine loadable."""
    from mlflow import MlflowClient

    from ssdopt import tracking

    client = MlflowClient(infra.mlflow_url, infra.mlflow_url)
    found = []
    for mv in client.search_model_versions(f"name='{model}'"):
        assert client.get_run(mv.run_id).info.status == "FINISHED", mv
        assert mv.tags.get("engine_sha256") and mv.tags.get("run_id") == mv.run_id, mv.tags
        local = tracking.resolve_engine_uri(f"models:/{model}/{mv.version}", tracking.local_store(tmp_path))
        assert (
            json.loads((local / "metadata.json").read_text())["engine"]["sha256"] == mv.tags["engine_sha256"]
        )
        found.append(str(mv.version))
    return found


def test_postgres_restarted_while_logging(
    as_team: Infra, engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    engine = _new_engine(engines["onnxruntime"], tmp_path / "onnxruntime-restart")
    before, errors, restarted = _refusals(as_team), [], threading.Event()

    def restart_once_refused() -> None:  # synchronised on the server's log, not on a sleep
        try:
            deadline = time.monotonic() + 60
            while _refusals(as_team) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            as_team.restart_postgres()
            restarted.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    restarter = threading.Thread(target=restart_once_refused, daemon=True)
    real_log_model = mlflow.pyfunc.log_model

    def log_model_with_postgres_restarting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        as_team.stop_postgres()  # returns once stopped: the run is open, its engine model not yet logged
        restarter.start()
        return real_log_model(*args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "log_model", log_model_with_postgres_restarting)
    started = time.monotonic()
    try:
        run_id, version = _log(engine, tmp_path, model="tiny-pg-restart")
    finally:
        restarter.join(90)
        if not restarted.is_set():
            as_team.restart_postgres()  # the module's later cases need their database
    elapsed = time.monotonic() - started
    refused = _refusals(as_team) - before
    print(f"observed: logged and registered v{version} in {elapsed:.1f} s; {refused} database errors logged")
    assert not errors and restarted.is_set(), errors
    assert refused >= 1, "PostgreSQL was never found down: the restart did not land mid-run"
    assert elapsed < 60, elapsed  # bounded: MLflow's retries as ssdopt sets them (3, backoff 1 s)
    assert _complete_versions(as_team, tmp_path, f"tiny-pg-restart.{_target(engine)}") == [version]
    assert _log(engine, tmp_path, model="tiny-pg-restart") == (run_id, version)  # nothing twice


def test_postgres_down_while_registering(
    as_team: Infra, engines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from ssdopt import tracking

    engine = _new_engine(engines["onnxruntime"], tmp_path / "onnxruntime-down")
    real_register = tracking._register

    def register_with_postgres_down(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        as_team.stop_postgres()  # the run finished with its artifacts; now its version is made
        return real_register(*args, **kwargs)

    monkeypatch.setattr(tracking, "_register", register_with_postgres_down)
    started = time.monotonic()
    try:
        with pytest.raises(SsdoptError) as info:
            _log(engine, tmp_path, model="tiny-pg-down")
    finally:
        as_team.restart_postgres()
    elapsed = time.monotonic() - started
    message = str(info.value)
    print(f"observed after {elapsed:.1f} s: {message}")
    assert elapsed < 60, elapsed  # bounded retries, then the error
    assert "database behind MLflow tracking server" in message and "PostgreSQL" in message, message
    assert as_team.mlflow_url in message and "Fix:" in message and "pg_ctl start" in message, message
    assert all(s not in message for s in as_team.secrets())
    model = f"tiny-pg-down.{_target(engine)}"
    client = MlflowClient(as_team.mlflow_url, as_team.mlflow_url)
    assert client.search_model_versions(f"name='{model}'") == []  # nothing half-registered

    monkeypatch.setattr(tracking, "_register", real_register)
    run_id, version = _log(engine, tmp_path, model="tiny-pg-down")  # the database back: the rerun
    assert _complete_versions(as_team, tmp_path, model) == [version]
    sha = json.loads((engine / "metadata.json").read_text())["engine"]["sha256"]
    exp = client.get_experiment_by_name("team").experiment_id
    runs = client.search_runs([exp], f"tags.`ssdopt.engine_sha256` = '{sha}'")
    assert [r.info.run_id for r in runs] == [run_id]  # the finished run registered, not logged again


def test_no_credentials_in_logs_stores_or_artifacts(as_team: Infra, engines, tmp_path: Path) -> None:
    import psycopg2

    _log(engines["onnxruntime"], tmp_path)
    secrets = as_team.secrets()
    for path in Path(as_team.root).rglob("*"):
        if path.is_file() and path.name not in ("basic_auth.ini", "infra.json"):  # the servers' own config
            text = path.read_text(errors="replace")
            assert not any(s in text for s in secrets), f"a credential in {path}"
    conn = psycopg2.connect(as_team.pg_uri("mlflow"))
    try:
        with conn.cursor() as cur:
            for table in ("params", "tags", "model_versions", "model_version_tags", "experiments"):
                cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
                text = repr(cur.fetchall())
                assert not any(s in text for s in secrets), f"a credential in table {table}"
    finally:
        conn.close()
    s3 = as_team._s3_client()
    for key in as_team.s3_objects():
        body = s3.get_object(Bucket="mlflow", Key=key)["Body"].read().decode("latin-1")
        assert not any(s in body for s in secrets), f"a credential in s3://mlflow/{key}"
