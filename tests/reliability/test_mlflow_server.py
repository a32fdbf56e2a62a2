"""A real `mlflow server --app-name basic-auth` on loopback (temporary auth config and databases), one
per module:

- unauthenticated or wrongly authenticated requests are refused, through ssdopt's tracking code with
  a clear SsdoptError that never repeats the password;
- two `optimize` flows at once on one repository, logging to that server with
  MLFLOW_TRACKING_USERNAME/PASSWORD: both finish, the DVC stage runs under the flows' lock (DVC alone
  refuses a second `dvc repro`), the shared engine is built once and never replaced under its
  reader, the registry gets one version, the champion loads from code with pickle disallowed, and
  the password appears nowhere: not in params or tags, Prefect's logs or database, the flows'
  stdout/stderr, the server's files;
- the server SIGKILLed in the middle of logging an engine: bounded retries, then one SsdoptError
  naming the server and the fix; the engines and what was logged locally are kept.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

# the basic-auth app needs mlflow[auth] (Flask-WTF); without it the server runs without auth and only
# the refusal test skips (the credentials are still in the flows' environment, and must still not leak)
HAVE_AUTH = importlib.util.find_spec("flask_wtf") is not None


support = sys.modules["ssdopt_tests_fault_support"]  # registered by conftest.py
PASSWORD = "pw-" + secrets.token_urlsafe(18)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    """Started at once (it takes seconds); tests wait for it through `server`."""
    root = tmp_path_factory.mktemp("mlflow-server")
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"  # one PBKDF2 check per credential, not one per request
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    server = support.MlflowServer(root, app_name="basic-auth" if HAVE_AUTH else None, env=env).start()
    yield server
    server.kill()


@pytest.fixture()
def server(auth_server):
    """The module's server, up (restarted on its databases if a test killed it)."""
    if auth_server.proc is None or auth_server.proc.poll() is not None:
        auth_server.start()
    return auth_server.wait()


def _as_user(monkeypatch: pytest.MonkeyPatch, url: str, password: str | None) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    if password is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.mark.skipif(
    not HAVE_AUTH, reason="mlflow[auth] (Flask-WTF) is not installed: `pip install -e .[dev]`"
)
def test_unauthenticated_and_wrong_password_are_refused(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    from ssdopt import tracking
    from ssdopt.errors import SsdoptError

    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert raw.value.code == 401

    wrong = "wrong-" + secrets.token_urlsafe(12)
    for password in (None, wrong):
        _as_user(monkeypatch, server.url, password)
        with pytest.raises(SsdoptError, match="credentials it accepts") as refused:
            tracking.compare_runs(tracking.local_store(tmp_path / "mlflow"), "ssdopt")
        print(f"observed ({'no' if password is None else 'wrong'} password): {refused.value}")
        assert wrong not in str(refused.value)
    out, err = capfd.readouterr()
    assert wrong not in out + err
    sys.stdout.write(out)

    # a password written into the URI is never repeated either (reports, logs, error messages)
    in_uri = server.url.replace("http://", f"http://admin:{wrong}@")
    assert tracking.redact_uri(f"see {in_uri}/api") == f"see {server.url.replace('//', '//admin:***@')}/api"

    _as_user(monkeypatch, server.url, PASSWORD)
    with pytest.raises(
        SsdoptError, match="an existing experiment"
    ):  # authenticated: the request went through
        tracking.compare_runs(tracking.local_store(tmp_path / "mlflow"), "no-such-experiment")


# a stage slow enough that the two flows meet on it; it records each execution
STAGE = (
    "python -c \"import pathlib, time; time.sleep(1); p = pathlib.Path('stage'); p.mkdir(exist_ok=True); "
    "(p / 'out.txt').write_text('done'); open('stage-runs.log', 'a').write('ran\\n')\""
)


def _project(root: Path, tiny_export) -> Path:
    from ssdopt.data.synthetic import generate_dataset

    data = generate_dataset(
        root / "data", seed=3, image_size=64, splits={"val": 4}, workers=1, progress=False
    )
    params = {
        "generate": {"out": str(data)},
        "build": {"onnx": str(tiny_export.model), "out": "engines", "calibration": {"directory": "unused"}},
        "optimize": {
            "engines": [{"backend": "onnxruntime", "precision": "fp32"}],
            "reference": {"backend": "onnxruntime", "precision": "fp32"},
            "eval_images": 4,
            "timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5},
            "min_agreement": 0.0,
            "experiment": "concurrent",
            "model_name": "tiny",
            "mlflow_root": "mlflow",
            "dvc_stages": ["slow"],
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {"cmd": STAGE, "outs": ["stage"]}}}))
    init = support.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=root)
    assert init.returncode == 0, init.stderr
    return root


def _files_holding(secret: str, *roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(str(path))
    return found


def test_two_optimize_flows_at_once_with_basic_auth(
    auth_server, tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the flows start (imports, temporary Prefect server) while the MLflow server may still be starting
    root = _project(tmp_path / "repo", tiny_export)
    env = support.clean_env(
        PREFECT_HOME=str(tmp_path / "prefect"),  # shared by both, as the Makefile's .prefect
        PREFECT_LOGGING_LEVEL="INFO",
        PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
        MLFLOW_TRACKING_URI=auth_server.url,
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=PASSWORD,
    )
    flow = [sys.executable, "-c", "from flows.optimize import main; main()"]
    procs = [
        subprocess.Popen(flow, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    server = auth_server.wait()
    outputs = [p.communicate(timeout=500)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
        assert "champion of tiny." in out, out[-2000:]
    joined = "\n".join(outputs)
    (tmp_path / "flows.log").write_text(joined)
    # no refusal by DVC, and no traceback (e.g. the two temporary Prefect servers racing to migrate
    # the shared PREFECT_HOME database: flows/optimize.py starts them one at a time)
    assert "Unable to acquire lock" not in joined and "Traceback" not in joined, joined[-4000:]
    assert PASSWORD not in joined, "the password reached the flows' output"

    # DVC: run once (the second flow found it up to date) or twice in sequence; never refused
    assert 1 <= (root / "stage-runs.log").read_text().count("ran") <= 2
    assert (root / "stage" / "out.txt").read_text() == "done"
    assert "slow" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]

    # one complete engine directory, no temp or lock leftovers; the report is whole
    engines = support.visible_entries(root / "engines")
    assert len(engines) == 1, engines
    support.assert_complete_engine(engines[0])
    assert [p.name for p in (root / "engines").iterdir()] == [engines[0].name]
    report = {"optimize.md", "index.html", "bench.json", "bench_context.json", "bench.md", "pareto.png"}
    assert {p.name for p in (root / "reports").iterdir()} == report  # whole files, no temp leftovers

    # MLflow: one finished run and one registry version for the engine, no secret in params or tags
    import mlflow

    _as_user(monkeypatch, server.url, PASSWORD)
    client = mlflow.MlflowClient(server.url, server.url)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    versions = client.search_model_versions("name LIKE 'tiny.%'")
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id
    meta = json.loads((engines[0] / "metadata.json").read_text())
    assert runs[0].data.tags["ssdopt.engine_sha256"] == meta["engine"]["sha256"]
    assert PASSWORD not in json.dumps([runs[0].data.params, runs[0].data.tags])
    assert runs[0].info.run_id in (root / "reports" / "optimize.md").read_text()

    # the champion loads from code through the authenticated server, pickle disallowed
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{versions[0].name}@champion")
    out = model.predict(np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32))
    assert out["boxes"].shape[0] == 1 and np.isfinite(out["scores"]).all()

    # nowhere on disk either: repository, Prefect's database and results, the server's store and log
    assert _files_holding(PASSWORD, root, tmp_path / "prefect", server.artifacts) == []
    assert _files_holding(PASSWORD, server.root) == [str(server.root / "basic_auth.ini")]  # hashed in auth.db


RUNS_OF_EXPERIMENT = (
    "select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id "
    "where e.name = 'server-down'"
)


PARAMS_OF_EXPERIMENT = (
    "select distinct r.run_uuid from runs r join experiments e on r.experiment_id = e.experiment_id "
    "join params p on p.run_uuid = r.run_uuid where e.name = 'server-down'"
)


def test_server_killed_mid_logging(
    server, tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs last in this module (it kills the server; `server` restarts it for any later test)."""
    from ssdopt import tracking
    from ssdopt.build import build_engine
    from ssdopt.errors import SsdoptError

    first = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path / "engines").path
    second = build_engine("openvino", "fp32", tiny_export.model, tmp_path / "engines").path
    _as_user(monkeypatch, server.url, PASSWORD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # the bounded default is 3; 2 keeps it short
    store = tracking.local_store(tmp_path / "mlflow")
    kwargs = {"params": {"p": 1}, "metrics": {"map": 0.5}, "registered_model": "killed.cpu"}
    tracking.log_engine_once(store, "server-down", first, **kwargs)

    failure: list[BaseException] = []

    def log_second() -> None:
        try:
            tracking.log_engine_once(store, "server-down", second, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    worker = threading.Thread(target=log_second)
    worker.start()
    deadline = time.monotonic() + 60
    while len(support.sqlite_rows(server.db, PARAMS_OF_EXPERIMENT)) < 2:  # the second run logs its params
        assert worker.is_alive() and time.monotonic() < deadline, "second run never started"
        time.sleep(0.005)
    server.kill()
    started = time.monotonic()
    worker.join(timeout=120)
    elapsed = time.monotonic() - started
    assert not worker.is_alive() and failure, "logging did not fail with the server gone"
    error = failure[0]
    print(f"observed after {elapsed:.1f} s: {type(error).__name__}: {error}")
    assert isinstance(error, SsdoptError), repr(error)
    assert "expected a reachable server" in str(error) and server.url in str(error)
    # refused (the next request), or reset/aborted when the kill lands inside a request
    assert re.search(r"Connection (refused|reset|aborted|broken)|Remote ?Disconnected", str(error)), str(
        error
    )
    assert PASSWORD not in str(error)
    if "refused" in str(error):  # a request sent after the kill was retried before giving up
        assert any("Retrying" in r.getMessage() for r in caplog.records), "no HTTP retries were made"
    assert elapsed < 60, "bounded retries should give up quickly"

    # kept locally: both engines, and the first run's logged artifacts
    for engine in (first, second):
        support.assert_complete_engine(engine)
    assert list((tmp_path / "mlflow" / "artifacts" / "server-down").glob("models/*/artifacts/MLmodel"))
    rows = dict(support.sqlite_rows(server.db, RUNS_OF_EXPERIMENT, strict=True))
    assert sorted(rows.values()) == ["FINISHED", "RUNNING"], rows  # the cut run stays RUNNING until a rerun
