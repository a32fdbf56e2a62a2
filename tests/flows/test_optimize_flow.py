"""The optimize flow end to end on a tiny model: engines, evaluation, MLflow registry, promotion,
the Prefect artifact, a pickle-free pyfunc load, and an idempotent rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssdopt.data.synthetic import generate_dataset


@pytest.fixture()
def tiny_project(tmp_path: Path, tiny_export, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    data = generate_dataset(
        tmp_path / "data", seed=3, image_size=64, splits={"val": 6}, workers=1, progress=False
    )
    params = {
        "generate": {"out": str(data)},
        "build": {
            "onnx": str(tiny_export.model),
            "out": str(tmp_path / "engines"),
            "calibration": {"directory": str(tmp_path / "unused")},
        },
        "optimize": {
            "engines": [
                {"backend": "onnxruntime", "precision": "fp32"},
                {"backend": "openvino", "precision": "fp32"},
                {"backend": "tensorrt", "precision": "fp16"},
            ],
            "reference": {"backend": "onnxruntime", "precision": "fp32"},
            "eval_images": 6,
            "timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5},
            "map_budget": 1.0,
            "min_agreement": 0.0,
            "experiment": "test",
            "model_name": "tiny",
            "mlflow_root": str(tmp_path / "mlflow"),
            "reports": str(tmp_path / "reports"),
            "dvc_stages": [],
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_optimize_builds_logs_and_promotes(tiny_project: Path, prefect_harness) -> None:
    import mlflow
    from prefect.client.orchestration import get_client

    from flows.optimize import optimize
    from ssdopt.tracking import local_store

    result = optimize(params_file=str(tiny_project))
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    assert (
        rows[("tensorrt", "fp16")]["status"] == "failed"
        and "tensorrt" in rows[("tensorrt", "fp16")]["reason"]
    )
    ort, ov = rows[("onnxruntime", "fp32")], rows[("openvino", "fp32")]
    assert ort["status"] == "validated" and ort["delta_map"] == 0.0
    assert ort["agreement"] in (1.0, None)  # itself; None (n/a) when nothing scores >= 0.3 in the tiny model
    assert ov["status"] == "validated" and abs(ov["delta_map"]) <= 1.0
    for row in (ort, ov):
        assert row["p99_ms"] >= row["p50_ms"] > 0 and row["version"] in {"1", "2"}

    # the run's report page: every engine's row with its status in words (no emoji font needed)
    reports = tiny_project.parent / "reports"
    page = (reports / "index.html").read_text()
    assert "built and validated" in page and "failed to build" in page and "tensorrt" in page
    bench = json.loads((reports / "bench.json").read_text())
    assert [(r["backend"], r["status"]) for r in bench][-1] == ("tensorrt", "❌")
    assert (reports / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    decision = result["decision"]
    champion = min((ort, ov), key=lambda r: r["p99_ms"])
    assert decision["champion"] == champion["version"]

    store = local_store(
        json.loads(json.dumps(yaml.safe_load(tiny_project.read_text())))["optimize"]["mlflow_root"]
    )
    mlflow.set_tracking_uri(store.tracking_uri)
    client = mlflow.MlflowClient()
    name = result["registered_model"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion["version"]

    # The registered engine loads from code (no pickle) and predicts fixed-size detections.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    out = model.predict(images)
    assert out["boxes"].shape[0] == 2 and out["boxes"].shape[2] == 4
    assert out["num_detections"].shape == (2,) and out["labels"].dtype == np.int32

    # The run's Prefect artifact links the champion's MLflow run.
    import asyncio

    async def artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts()

    found = [a for a in asyncio.run(artifacts()) if a.key == "optimize-report"]
    assert found and champion["run_id"] in found[-1].data

    # A rerun with nothing changed adds no run and no registry version.
    again = optimize(params_file=str(tiny_project))
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    assert {r.get("run_id") for r in again["rows"]} == {r.get("run_id") for r in result["rows"]}


def test_detect_resolves_a_registry_uri(tiny_project: Path, prefect_harness, tmp_path: Path) -> None:
    from flows.optimize import optimize
    from ssdopt.tracking import local_store, resolve_engine_uri

    result = optimize(params_file=str(tiny_project))
    store = local_store(yaml.safe_load(tiny_project.read_text())["optimize"]["mlflow_root"])
    engine = resolve_engine_uri(f"models:/{result['registered_model']}@champion", store)
    meta = json.loads((engine / "metadata.json").read_text())
    assert meta["backend"] in {"onnxruntime", "openvino"}
    with pytest.raises(Exception, match="registered engine"):
        resolve_engine_uri(f"models:/{result['registered_model']}@nope", store)


def test_engine_list_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.optimize as flow_module
    from ssdopt.errors import SsdoptError

    opt = {
        "engines": [{"backend": "onnxruntime", "precision": "fp32"}],
        "gpu_engines": [{"backend": "torch-aoti", "precision": "fp16"}],
    }
    as_pairs = lambda engines: [(e["backend"], e["device"]) for e in engines]  # noqa: E731
    assert as_pairs(flow_module.engine_list(opt, "cpu")) == [("onnxruntime", "cpu")]
    assert as_pairs(flow_module.engine_list(opt, "cuda")) == [("torch-aoti", "cuda")]
    both = [("onnxruntime", "cpu"), ("torch-aoti", "cuda")]
    assert as_pairs(flow_module.engine_list(opt, "all")) == both
    for present in (False, True):
        monkeypatch.setattr(flow_module, "cuda_present", lambda present=present: present)
        assert as_pairs(flow_module.engine_list(opt, "auto")) == (both if present else both[:1])
    with pytest.raises(SsdoptError, match="one of auto, cpu, cuda, all"):
        flow_module.engine_list(opt, "gpu")


def test_gpu_engines_without_a_gpu_are_failed_rows_and_cpu_engines_complete(
    tiny_project: Path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What CI sees with the GPU engine list: each GPU engine a ❌ row with its reason, the CPU engines
    built, validated and registered under the CPU target only."""
    import torch

    from flows.optimize import optimize
    from ssdopt.backends.device import deployment_target

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same outcome on a GPU host
    params = yaml.safe_load(tiny_project.read_text())
    params["optimize"]["engines"] = [{"backend": "onnxruntime", "precision": "fp32"}]
    params["optimize"]["gpu_engines"] = [
        {"backend": "torch-aoti", "precision": "fp16"},
        {"backend": "tensorrt", "precision": "fp16"},
    ]
    tiny_project.write_text(yaml.safe_dump(params))

    result = optimize(params_file=str(tiny_project), device="all")
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    for key, words in ((("torch-aoti", "fp16"), "CUDA"), (("tensorrt", "fp16"), "tensorrt")):
        assert rows[key]["status"] == "failed" and words in rows[key]["reason"], rows[key]
        assert rows[key]["device"] == "cuda" and rows[key]["target"].startswith("cuda")
        assert "version" not in rows[key]
    cpu = rows[("onnxruntime", "fp32")]
    assert cpu["status"] == "validated" and cpu["target"] == deployment_target("cpu")
    assert set(result["decisions"]) == {cpu["target"], rows[("torch-aoti", "fp16")]["target"]}
    assert result["decisions"][cpu["target"]]["champion"] == cpu["version"]
    assert result["decisions"][rows[("torch-aoti", "fp16")]["target"]]["champion"] is None
