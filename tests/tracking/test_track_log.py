"""`ssdopt track log`: an engine built and measured on another machine (a GPU build box) is registered
here under the target of its own metadata, without being loaded; promotion runs per target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

SSDOPT = Path(sys.executable).with_name("ssdopt")
H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "memory_mib": 143771}


def _ssdopt(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([str(SSDOPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _as_if_built_on_a_gpu(engine: Path, out: Path) -> Path:
    """A copy whose metadata says it was built on an H200 (its bytes differ, as a real one's would)."""
    shutil.copytree(engine, out)
    model = onnx.load(str(out / "engine.onnx"))
    model.doc_string = "built on the GPU build box"
    onnx.save(model, str(out / "engine.onnx"))
    meta = json.loads((out / "metadata.json").read_text())
    meta["device"] = H200
    meta["engine"]["sha256"] = sha256_file(out / "engine.onnx")
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    params = {
        "optimize": {
            "mlflow_root": "mlflow",
            "model_name": "tiny",
            "experiment": "byo",
            "min_agreement": 0.0,
        },
        "bench": {"timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_gpu_engine_registers_under_its_own_target_and_promotes(tiny_export, project: Path) -> None:
    from ssdopt.backends import get_backend
    from ssdopt.backends.device import deployment_target
    from ssdopt.build import build_engine
    from ssdopt.data.synthetic import generate_dataset

    data = generate_dataset(
        project / "data", seed=2, image_size=64, splits={"val": 4}, workers=1, progress=False
    )
    cpu = build_engine("onnxruntime", "fp32", tiny_export.model, project / "engines").path
    _ssdopt(
        project, "evaluate", str(cpu), "--dataset", str(data / "val.json"), "--reference", str(cpu),
        "--out", "eval.json",
    )  # fmt: skip
    evaluation = json.loads((project / "eval.json").read_text())
    assert evaluation["delta_map"] == 0.0 and evaluation["p99_ms"] >= evaluation["p50_ms"] > 0
    assert evaluation["measured_on"]["device"]["kind"] == "cpu"

    cpu_target = deployment_target("cpu")
    out = _ssdopt(project, "track", "log", str(cpu), "--evaluation", "eval.json")
    assert f"tiny.{cpu_target} v1" in out and "champion v1" in out

    gpu = _as_if_built_on_a_gpu(cpu, project / "gpu-engine")
    with pytest.raises(SsdoptError, match="H200"):  # cannot run here ...
        get_backend("onnxruntime").load(gpu)
    out = _ssdopt(project, "track", "log", str(gpu), "--evaluation", "eval.json")  # ... but registers
    assert "tiny.cuda-sm90-nvidia-h200 v1" in out and "champion v1" in out
    again = _ssdopt(project, "track", "log", str(gpu), "--evaluation", "eval.json")
    assert "tiny.cuda-sm90-nvidia-h200 v1" in again  # logged once: no second version

    import mlflow

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)  # registry too: an earlier test may have set a global one
    names = sorted(m.name for m in client.search_registered_models())
    assert names == sorted([f"tiny.{cpu_target}", "tiny.cuda-sm90-nvidia-h200"])
    (version,) = client.search_model_versions("name='tiny.cuda-sm90-nvidia-h200'")
    assert version.tags["backend"] == "onnxruntime" and version.tags["target"] == "cuda-sm90-nvidia-h200"
    assert version.tags["precision"] == "fp32" and "NVIDIA H200" in version.description
    run = client.get_run(version.run_id)
    env = {**os.environ, "COLUMNS": "80"}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    table = subprocess.run(
        [str(SSDOPT), "compare"], cwd=project, env=env, capture_output=True, text=True
    ).stdout
    assert "onnxruntime" in table and max(len(line) for line in table.splitlines()) <= 80, table
    assert (
        run.data.params["device"] == "cuda-sm90-nvidia-h200" and run.data.tags["ssdopt.validated"] == "true"
    )
    assert run.data.metrics["p99_ms"] == pytest.approx(evaluation["p99_ms"])


def test_an_evaluation_without_reference_registers_but_cannot_be_champion(tiny_export, project: Path) -> None:
    from ssdopt.build import build_engine

    engine = build_engine("onnxruntime", "fp32", tiny_export.model, project / "engines").path
    (project / "eval.json").write_text(json.dumps({"map": 0.1, "p50_ms": 1.0, "p99_ms": 2.0}))
    out = _ssdopt(project, "track", "log", str(engine), "--evaluation", "eval.json")
    assert "champion vNone" in out and "failed validation" in out
