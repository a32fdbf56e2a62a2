"""The shared Prefect server on PostgreSQL with one process work pool per deployment target, a worker
per pool and one `optimize` deployment per pool (that pool's target, engines and device as its
parameters), against the shared MLflow:

- both pools' runs at once: both complete, the CPU pool's engine is registered under its pool's
  target with a champion, the GPU pool's run registers nothing among the CPU engines (without a GPU
  here its engine is a ❌ row);
- a worker killed mid-run (SIGKILL to its process group and to the flow run it started, as when its
  machine dies): the run, seen RUNNING, is marked CRASHED by the server's zombie automation once its
  heartbeats stop; a rerun on a new worker completes with exactly one registered version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssdopt.backends.device import deployment_target
from ssdopt.data.synthetic import generate_dataset
from ssdopt.infra import Infra, _spawn, _venv_tool, stop_group

WITH_PREFECT = True  # tests/infra/conftest.py: the Prefect server too
ZOMBIE_AFTER_S = 35  # the server's zombie automation (a team's default: 90 s); > the 30 s heartbeats

ROOT = Path(__file__).resolve().parents[2]
CPU_POOL, GPU_POOL = deployment_target("cpu"), "cuda-sm90-nvidia-h200"  # pools named after targets

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


START_RUN = """
import json, sys
from prefect import flow
from prefect.deployments import run_deployment

root, name, pool, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if params:
    flow.from_source(source=root, entrypoint="flows/optimize.py:optimize").deploy(
        name=name, work_pool_name=pool, parameters=params, print_next_steps=False
    )
print("RUN", run_deployment(f"optimize/{name}", timeout=0).id)
"""


def _params(tmp_path: Path, tiny_export, name: str, engines: list[dict], device: str, **optimize) -> dict:
    data = tmp_path / "data"
    if not (data / "dataset.json").is_file():
        data = generate_dataset(data, seed=3, image_size=64, splits={"val": 4}, workers=1, progress=False)
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
            **optimize,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return {"params_file": str(path), "device": device}


def _worker(pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [_venv_tool("prefect"), "worker", "start", "--pool", pool, "--limit", "1"]
    return _spawn(command, log, {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, ROOT)  # default: 15 s


def _create_pool(pool: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [_venv_tool("prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


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
    for pool, params in pools.items():
        params["target"] = pool  # the pool's deployment target, a parameter of its deployment
    workers = []
    try:
        for pool in pools:
            _create_pool(pool, env)
            workers.append(_worker(pool, env, tmp_path / f"worker-{pool}.log"))
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
    names = {m.name for m in client.search_registered_models() if m.name.startswith("tiny-pools.")}
    assert names == {cpu_model}, names  # the GPU pool's run put nothing among the CPU engines


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_worker_and_its_runs(worker: subprocess.Popen) -> list[int]:
    """SIGKILL the worker's process group and the group of every process it started (the flow run
    runs in a session of its own): what a worker machine's death does. Returns the processes that
    were running under the worker, every one of which is gone when this returns."""
    pids = [p for p in _descendants(worker.pid) if _alive(p)]
    groups = {worker.pid} | {os.getpgid(p) for p in pids}
    groups.discard(os.getpgrp())  # never this test's own group
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a process of the killed worker still runs"
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_run(env: dict[str, str], cwd: Path, name: str, params: dict | None = None) -> str:
    """Deploy `optimize/NAME` to the CPU pool (when `params` are given) and start one run of it."""
    done = subprocess.run(
        [sys.executable, "-c", START_RUN, str(ROOT), name, CPU_POOL, json.dumps(params or {})],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("RUN ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    return line.split()[1]


def _wait_state(infra: Infra, run_id: str, types: set[str], timeout: float, logs: Path) -> dict:
    """Poll the server until the flow run's state type is one of `types` (or final)."""
    deadline = time.monotonic() + timeout
    while True:
        state = infra._prefect_request("GET", f"/flow_runs/{run_id}")["state"]
        if state["type"] in types | {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text(errors="replace")[-1500:] for p in logs.glob("worker-*.log"))
            raise AssertionError(f"flow run {run_id} still {state['type']} after {timeout:.0f} s\n{tails}")
        time.sleep(0.2)


def test_worker_killed_mid_run_crashes_and_a_rerun_registers_once(
    infra: Infra, tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    env = {**infra.prefect_env(), **infra.client_env(), "PYTHONPATH": str(ROOT)}
    engines = [{"backend": "onnxruntime", "precision": "fp32"}]
    slow = {"warmup_s": 0.01, "min_duration_s": 4.0, "min_iterations": 5}  # a RUNNING window of seconds
    params = _params(
        tmp_path,
        tiny_export,
        "kill",
        engines,
        "cpu",
        model_name="tiny-kill",
        experiment="team-kill",
        timing=slow,
    )
    params["target"] = CPU_POOL
    _create_pool(CPU_POOL, env)
    worker = _worker(CPU_POOL, env, tmp_path / "worker-1.log")
    try:
        started = time.monotonic()
        run_id = _start_run(env, tmp_path, "kill", params)
        state = _wait_state(infra, run_id, {"RUNNING"}, 120, tmp_path)
        assert state["type"] == "RUNNING", state
        killed = _kill_worker_and_its_runs(worker)
        killed_at = time.monotonic()
        assert killed, "the worker ran no process for the flow run"
        state = _wait_state(infra, run_id, set(), ZOMBIE_AFTER_S + 45, tmp_path)
        print(
            f"observed: {state['type']} ({state['name']}: {state['message']}) "
            f"{time.monotonic() - killed_at:.1f} s after the SIGKILL of {len(killed)} processes, "
            f"{killed_at - started:.1f} s into the run"
        )
        assert state["type"] == "CRASHED", state  # not COMPLETED: the kill landed mid-run

        worker = _worker(CPU_POOL, env, tmp_path / "worker-2.log")
        rerun = _start_run(env, tmp_path, "kill")  # the same deployment, run again
        state = _wait_state(infra, rerun, set(), 180, tmp_path)
        assert state["type"] == "COMPLETED", state
        print(f"rerun completed {time.monotonic() - started:.1f} s after the first run started")
    finally:
        stop_group(worker.pid)

    for name, value in infra.client_env().items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(infra.mlflow_url, infra.mlflow_url)
    model = f"tiny-kill.{CPU_POOL}"
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == 1, versions  # the crashed run left no version, the rerun exactly one
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ssdopt.target"] == CPU_POOL
    assert client.get_model_version_by_alias(model, "champion").version == versions[0].version
