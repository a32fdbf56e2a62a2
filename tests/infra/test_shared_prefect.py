"""The shared Prefect server on PostgreSQL with one process work pool per deployment target, a worker
per pool and one `optimize` deployment per pool (that pool's engines and device from its
parameters), both run at once against the shared MLflow: both complete, the CPU pool's engine is
registered under this machine's CPU target with a champion, the GPU pool's run registers nothing
among the CPU engines (without a GPU here its engine is a ❌ row)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssdopt.backends.device import deployment_target
from ssdopt.data.synthetic import generate_dataset
from ssdopt.infra import Infra, _spawn, _venv_tool, stop_group

WITH_PREFECT = True  # tests/infra/conftest.py: the Prefect server too

ROOT = Path(__file__).resolve().parents[2]
CPU_POOL, GPU_POOL = deployment_target("cpu"), "cuda-gpu"

DRIVER = """
import json, sys
from prefect import flow
from prefect.deployments import run_deployment

root, pools = sys.argv[1], json.loads(sys.argv[2])
for pool, params in pools.items():
    flow.from_source(source=root, entrypoint="flows/optimize.py:optimize").deploy(
        name=pool, work_pool_name=pool, parameters=params, print_next_steps=False
    )
runs = [run_deployment(f"optimize/{pool}", timeout=0) for pool in pools]  # both at once
from prefect.client.orchestration import get_client
import time
deadline = time.monotonic() + 240
with get_client(sync_client=True) as client:
    while True:
        states = [client.read_flow_run(r.id).state for r in runs]
        if all(s.is_final() for s in states) or time.monotonic() > deadline:
            break
        time.sleep(1)
print("RESULT " + json.dumps({p: [s.type.value, s.message] for p, s in zip(pools, states)}))
"""


def _params(tmp_path: Path, tiny_export, name: str, engines: list[dict], device: str) -> dict:
    data = generate_dataset(
        tmp_path / "data", seed=3, image_size=64, splits={"val": 4}, workers=1, progress=False
    )
    params = {
        "generate": {"out": str(data)},
        "build": {
            "onnx": str(tiny_export.model),
            "out": str(tmp_path / name / "engines"),
            "calibration": {"directory": str(tmp_path / "unused")},
        },
        "optimize": {
            "engines": engines,
            "reference": {"backend": "onnxruntime", "precision": "fp32"},
            "eval_images": 4,
            "timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5},
            "min_agreement": 0.0,
            "experiment": "team-pools",
            "model_name": "tiny-pools",
            "mlflow_root": str(tmp_path / name / "mlflow"),
            "reports": str(tmp_path / name / "reports"),
            "dvc_stages": [],
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return {"params_file": str(path), "device": device}


def test_two_pools_run_at_once(
    infra: Infra, tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    env = {**infra.prefect_env(), **infra.client_env(), "PYTHONPATH": str(ROOT)}
    pools = {
        CPU_POOL: _params(
            tmp_path, tiny_export, "cpu", [{"backend": "onnxruntime", "precision": "fp32"}], "cpu"
        ),
        GPU_POOL: _params(
            tmp_path,
            tiny_export,
            "gpu",
            [{"backend": "onnxruntime", "precision": "fp32", "device": "cuda"}],
            "cuda",
        ),
    }
    workers = []
    try:
        for pool in pools:
            done = subprocess.run(
                [_venv_tool("prefect"), "work-pool", "create", pool, "--type", "process"],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            log = tmp_path / f"worker-{pool}.log"
            command = [_venv_tool("prefect"), "worker", "start", "--pool", pool, "--limit", "1"]
            workers.append(_spawn(command, log, env, ROOT))
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT), json.dumps(pools)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        _check(driver, infra, tmp_path, monkeypatch)
    finally:
        for worker in workers:
            stop_group(worker.pid)


def _check(driver, infra: Infra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs' states and the shared registry, checked while the workers still run."""
    from mlflow import MlflowClient

    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("worker-*.log"))
    line = next((x for x in driver.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, f"{driver.stdout[-2000:]}\n{driver.stderr[-3000:]}\n{logs}"
    states = json.loads(line[len("RESULT ") :])
    assert all(state == "COMPLETED" for state, _ in states.values()), f"{states}\n{logs}"

    for name, value in infra.client_env().items():  # basic auth for the client below
        monkeypatch.setenv(name, value)
    client = MlflowClient(infra.mlflow_url, infra.mlflow_url)  # the registry too: not a global one
    cpu_model = f"tiny-pools.{CPU_POOL}"
    versions = client.search_model_versions(f"name='{cpu_model}'")
    assert len(versions) == 1, versions
    assert client.get_model_version_by_alias(cpu_model, "champion").version == versions[0].version
    names = {m.name for m in client.search_registered_models()}
    assert names == {cpu_model}, names  # the GPU pool's run put nothing among the CPU engines
