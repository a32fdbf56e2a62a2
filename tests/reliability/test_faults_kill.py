"""kill -9 in the middle of an engine build, a calibration-set selection and MLflow logging, then a
rerun: it completes, nothing is corrupt, and the registry holds one version per engine.

Each step runs in a subprocess that is SIGKILLed at a point observed on disk (a temp directory or a
row appearing), never through a test hook in the code.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

support = sys.modules["ssdopt_tests_fault_support"]  # registered by conftest.py


def test_kill_9_during_int8_build_then_rerun(tiny_export, tiny_calibration, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    command = [
        *support.CLI,
        "build",
        "--backend",
        "onnxruntime",
        "--precision",
        "int8",
        "--onnx",
        str(tiny_export.model),
        "--out",
        str(out),
        "--calibration",
        str(tiny_calibration),
    ]
    # 1. while calibrating: ORT's augmented graph is being run over the calibration images
    support.kill_when(
        command, lambda: any(out.glob(".prepare-*/*/.calibrate-*/augmented.onnx")), cwd=tmp_path
    )
    assert support.visible_entries(out) == [], "a killed build left something that looks like an engine"
    # 2. while the engine directory is being written (after quantization)
    support.kill_when(command, lambda: any(out.glob("*.tmp-*")), cwd=tmp_path)
    assert support.visible_entries(out) == [], "a killed build left something that looks like an engine"
    print("left by two kill -9:", sorted(p.name for p in out.iterdir()))

    done = support.run(command, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    engine = Path(re.search(r"engine: (\S+)", done.stdout).group(1))
    meta = support.assert_complete_engine(engine)
    assert meta["precision"] == "int8" and meta["quantization"]
    assert support.visible_entries(out) == [engine]
    assert [p.name for p in out.iterdir()] == [engine.name], "the killed builds' temp dirs were not cleared"

    from ssdopt.backends import get_backend

    runner = get_backend("onnxruntime").load(engine)  # checks metadata and sha256 again, then runs
    images = np.random.default_rng(0).random((1, 3, tiny_export.image_size, tiny_export.image_size))
    runner.infer(images.astype(np.float32))
    runner.close()


def test_kill_9_during_calibration_selection_then_rerun(tmp_path: Path) -> None:
    from ssdopt.data.calibration import read_calibration_images, select_calibration_set
    from ssdopt.data.synthetic import generate_dataset

    data = generate_dataset(
        tmp_path / "data", seed=5, image_size=96, splits={"train": 240}, workers=1, progress=False
    )
    out = tmp_path / "calibration"
    select_calibration_set(
        data / "train.json", data / "train", out, num_images=200, strategy="random", seed=0
    )
    before = (out / "manifest.json").read_bytes()
    command = [
        *support.CLI,
        "data",
        "calibration",
        "--dataset",
        str(data),
        "--out",
        str(out),
        "--num-images",
        "200",
        "--strategy",
        "random",
        "--seed",
        "1",
    ]
    # killed while copying images into the temp directory that will replace `out`
    support.kill_when(command, lambda: any(out.parent.glob("calibration.tmp-*/images/*.jpg")), cwd=tmp_path)
    assert (out / "manifest.json").read_bytes() == before, "the earlier calibration set was touched"
    assert len(list(read_calibration_images(out, 32))) == 200  # every file matches its sha256

    done = support.run(command, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 1 and len(manifest["images"]) == 200
    assert len(list(read_calibration_images(out, 32))) == 200
    assert [p.name for p in support.visible_entries(tmp_path) if p.name.startswith("calibration")] == [
        "calibration"
    ]


# MLflow: the child logs one engine into a SQLite store and is killed once the engine model's files
# are being written (run RUNNING, logged model pending, nothing registered). The rerun (in this
# process) must finish the job. The window between the run's end and its registration is covered by
# test_finished_run_without_version_is_registered_not_relogged.
LOG_ONE = """
import sys
from pathlib import Path
from ssdopt import tracking
store = tracking.local_store(sys.argv[1])
print(tracking.log_engine_once(store, "faults", Path(sys.argv[2]), params={"backend": "onnxruntime"},
      metrics={"map": 0.5, "p99_ms": 1.0, "delta_map": 0.0}, registered_model="tiny.cpu"))
"""


@pytest.fixture(scope="module")
def fp32_engine(tiny_export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ssdopt.build import build_engine

    return build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path_factory.mktemp("engines")).path


def _run_running_and_mlmodel_written(root: Path) -> bool:
    """The kill point, on states the code commits: the run's row is in the database as RUNNING (so
    the rerun has a run to supersede) and the engine model's MLmodel file is on disk."""
    if not any((root / "artifacts").glob("faults/models/*/artifacts/MLmodel")):
        return False
    rows = support.sqlite_rows(root / "mlflow.db", "select status from runs")
    return bool(rows) and all(status == "RUNNING" for (status,) in rows)


def test_kill_9_during_mlflow_logging_then_rerun(
    fp32_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from ssdopt import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlflow"
    db = root / "mlflow.db"
    support.kill_when(
        [sys.executable, "-c", LOG_ONE, str(root), str(fp32_engine)],
        lambda: _run_running_and_mlmodel_written(root),
        cwd=tmp_path,
    )
    left = support.sqlite_rows(db, "select run_uuid, status from runs", strict=True)
    assert left and all(status == "RUNNING" for _, status in left), left

    store = tracking.local_store(root)
    run_id, version = tracking.log_engine_once(
        store,
        "faults",
        fp32_engine,
        params={"backend": "onnxruntime"},
        metrics={"map": 0.5, "p99_ms": 1.0, "delta_map": 0.0},
        registered_model="tiny.cpu",
    )
    client = mlflow.MlflowClient(store.tracking_uri, store.tracking_uri)
    versions = client.search_model_versions("name='tiny.cpu'")
    assert [(str(v.version), v.run_id) for v in versions] == [(version, run_id)]
    statuses = dict(support.sqlite_rows(db, "select run_uuid, status from runs", strict=True))
    assert statuses.pop(run_id) == "FINISHED"
    assert set(statuses.values()) == {"KILLED"}, statuses  # the killed child's run, marked as such
    # a second rerun adds nothing
    assert tracking.log_engine_once(
        store, "faults", fp32_engine, params={}, metrics={}, registered_model="tiny.cpu"
    )[1] == (version)
    assert len(client.search_model_versions("name='tiny.cpu'")) == 1

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    signature = mlflow.models.get_model_info(f"models:/tiny.cpu/{version}").signature
    assert list(signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:]) == [3, 64, 64]
    assert [o["name"] for o in signature.outputs.to_dict()] == ["num_detections", "boxes", "scores", "labels"]
    model = mlflow.pyfunc.load_model(f"models:/tiny.cpu/{version}")
    out = model.predict(np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32))
    assert out["boxes"].shape[0] == 1 and np.isfinite(out["scores"]).all()


def test_finished_run_without_version_is_registered_not_relogged(
    fp32_engine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process died between the run's end and the registration: the rerun registers that run."""
    from ssdopt import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tracking.local_store(tmp_path / "mlflow")
    sha = json.loads((fp32_engine / "metadata.json").read_text())["engine"]["sha256"]
    first, none = tracking.log_engine_run(
        store, "faults", fp32_engine, {}, {"map": 0.5}, tags={"ssdopt.engine_sha256": sha}
    )
    assert none is None
    run_id, version = tracking.log_engine_once(
        store, "faults", fp32_engine, params={}, metrics={}, registered_model="m"
    )
    assert (run_id, version) == (first, "1")
    rows = support.sqlite_rows(store.lock_file.parent / "mlflow.db", "select status from runs")
    assert rows == [("FINISHED",)]
