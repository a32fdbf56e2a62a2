"""The optimize flow through a real Prefect deployment: `prefect server start` on loopback, a process
work pool, a worker, `flow.from_source(...).deploy(...)` and `run_deployment` on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ssdopt.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).with_name("prefect")
SERVER_START_S = 90

# Runs in a subprocess pointed at the test server, so this process's Prefect settings stay untouched.
DRIVER = """
import json, sys
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment

root, params = sys.argv[1], sys.argv[2]
deployment = flow.from_source(source=root, entrypoint="flows/optimize.py:optimize").deploy(
    name="tiny", work_pool_name="test-pool", parameters={"params_file": params}, print_next_steps=False
)
run = run_deployment("optimize/tiny", timeout=240, poll_interval=2)
with get_client(sync_client=True) as client:
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
print("RESULT " + json.dumps({
    "deployment": str(deployment),
    "state": run.state.type.value,
    "message": run.state.message,
    "artifacts": {a.key: a.data for a in artifacts if a.key},
}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End the process group this test started (server or worker and their children)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture()
def prefect_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port, its state under tmp; torn down afterwards."""
    if not PREFECT.exists():
        pytest.skip("prefect CLI not installed in this environment")
    home = tmp_path / "prefect"
    home.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{PREFECT.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_PROFILE", None)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = (tmp_path / "server.log").read_text()[-1500:]
                pytest.skip(f"prefect server did not answer /api/health within {SERVER_START_S} s:\n{tail}")
            time.sleep(1)
        yield env
    finally:
        _stop(server)
        log.close()


@pytest.fixture()
def tiny_params(tmp_path: Path, tiny_export) -> Path:
    data = generate_dataset(
        tmp_path / "data", seed=3, image_size=64, splits={"val": 4}, workers=1, progress=False
    )
    params = {
        "generate": {"out": str(data)},
        "build": {
            "onnx": str(tiny_export.model),
            "out": str(tmp_path / "engines"),
            "calibration": {"directory": str(tmp_path / "unused")},
        },
        "optimize": {
            "engines": [{"backend": "onnxruntime", "precision": "fp32"}],
            "reference": {"backend": "onnxruntime", "precision": "fp32"},
            "eval_images": 4,
            "timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5},
            "map_budget": 1.0,
            "min_agreement": 0.0,
            "experiment": "deployment-test",
            "model_name": "tiny",
            "mlflow_root": str(tmp_path / "mlflow"),
            "dvc_stages": [],
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_optimize_runs_through_a_deployment_and_worker(
    prefect_env: dict[str, str], tiny_params: Path, tmp_path: Path
) -> None:
    def prefect(*args: str) -> None:
        proc = subprocess.run(
            [str(PREFECT), *args], env=prefect_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"

    prefect("work-pool", "create", "test-pool", "--type", "process")
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        [str(PREFECT), "worker", "start", "--pool", "test-pool", "--limit", "1"],
        env=prefect_env,
        cwd=ROOT,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT), str(tiny_params)],
            env=prefect_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _stop(worker)
        worker_log.close()
    worker_tail = (tmp_path / "worker.log").read_text()[-3000:]
    line = next((x for x in driver.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert driver.returncode == 0 and line, f"{driver.stdout[-2000:]}\n{driver.stderr[-3000:]}\n{worker_tail}"
    result = json.loads(line[len("RESULT ") :])
    assert result["state"] == "COMPLETED", f"{result}\n{worker_tail}"
    report = result["artifacts"]["optimize-report"]
    assert "Champion: **tiny." in report and "MLflow run" in report
    assert (tmp_path / "mlflow").is_dir()
