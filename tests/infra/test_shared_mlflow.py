"""A team's shared MLflow, for real: PostgreSQL backend store, moto S3 artifacts, basic auth, all on
loopback, started by ssdopt.infra (the code behind `make infra-up`). Engines are the tiny model's.

- an engine is logged, registered, promoted and loaded back as models:/NAME@champion through the
  server, its artifacts in the S3 bucket; logging it again adds no run and no version;
- `ssdopt compare` reads the runs from the shared server;
- the S3 store down while logging: one clear error naming the artifact store, the engine kept on
  disk, no registry version for it;
- no credential (PostgreSQL, S3, MLflow admin) in the servers' logs, the runs' params and tags, the
  registry or the artifacts.
"""

from __future__ import annotations

import json
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


def _log(engine: Path, tmp_path: Path) -> tuple[str, str | None]:
    from ssdopt import tracking

    return tracking.log_engine_once(
        tracking.local_store(tmp_path / "mlflow"),
        "team",
        engine,
        params={"backend": engine.name.split("-")[0], "precision": "fp32", "device": _target(engine)},
        metrics={"p99_ms": 1.0, "delta_map": 0.0, "map": 0.5},
        registered_model=f"tiny-team.{_target(engine)}",
        tags={"ssdopt.target": _target(engine), "ssdopt.validated": "true"},
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


def test_compare_reads_the_shared_server(as_team: Infra, engines, tmp_path: Path, capsys) -> None:
    import sys

    from ssdopt.cli import main

    _log(engines["onnxruntime"], tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"optimize:\n  experiment: team\n  mlflow_root: {tmp_path}/mlflow\n"
    )
    sys.argv = ["ssdopt", "compare"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "fp32" in out and "0.5000" in out, out


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
