"""Disk full: an engine build, a calibration-set selection and MLflow logging onto a tiny tmpfs fail
cleanly (exit code 2 or SsdoptError naming the place and the fix) and leave nothing partial behind.

Mounting needs root: without it these tests skip, saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

support = sys.modules["ssdopt_tests_fault_support"]  # registered by conftest.py


def _everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# 64k: ONNX Runtime cannot write the optimised engine; 96k: the engine fits, the sidecar copies do not
@pytest.mark.parametrize("size", ["64k", "96k"])
def test_build_onto_a_full_disk_fails_cleanly(size: str, tiny_export, tmp_path: Path) -> None:
    with support.small_tmpfs(tmp_path / "disk", size) as disk:
        command = [*support.CLI, "build", "--backend", "onnxruntime", "--precision", "fp32"]
        done = support.run(
            command + ["--onnx", str(tiny_export.model), "--out", str(disk / "engines")], cwd=tmp_path
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert "expected free space" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert _everything(disk) in ([], ["engines"]), "a failed build left files behind"


def test_calibration_onto_a_full_disk_fails_cleanly(tmp_path: Path) -> None:
    from ssdopt.data.synthetic import generate_dataset

    data = generate_dataset(
        tmp_path / "data", seed=2, image_size=96, splits={"train": 40}, workers=1, progress=False
    )
    with support.small_tmpfs(tmp_path / "disk", "128k") as disk:
        command = [
            *support.CLI,
            "data",
            "calibration",
            "--dataset",
            str(data),
            "--out",
            str(disk / "calibration"),
        ]
        done = support.run(command + ["--num-images", "40", "--strategy", "random"], cwd=tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "expected free space" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert _everything(disk) == [], "a failed selection left files behind"


def test_mlflow_logging_onto_a_full_disk_fails_cleanly_then_reruns(
    tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Artifacts on a full disk (the SQLite store elsewhere): SsdoptError, the run FAILED; after space
    is back, the rerun logs the engine once."""
    import mlflow

    from ssdopt import tracking
    from ssdopt.build import build_engine
    from ssdopt.errors import SsdoptError

    engine = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path / "engines").path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    kwargs = {"params": {"backend": "onnxruntime"}, "metrics": {"map": 0.5}, "registered_model": "tiny.cpu"}
    with support.small_tmpfs(tmp_path / "disk", "64k") as disk:
        store = tracking.local_store(disk)  # artifacts under disk/artifacts
        with pytest.raises(SsdoptError, match="free space for the run's artifacts") as failed:
            tracking.log_engine_once(store, "full", engine, **kwargs)
        print(f"observed: {failed.value}")
    client = mlflow.MlflowClient(store.tracking_uri, store.tracking_uri)
    exp = client.get_experiment_by_name("full").experiment_id
    assert [r.info.status for r in client.search_runs([exp])] == ["FAILED"]
    assert client.search_model_versions("name='tiny.cpu'") == []

    run_id, version = tracking.log_engine_once(store, "full", engine, **kwargs)  # space is back
    assert version == "1" and client.get_run(run_id).info.status == "FINISHED"
    meta = json.loads((engine / "metadata.json").read_text())
    assert client.get_run(run_id).data.tags["ssdopt.engine_sha256"] == meta["engine"]["sha256"]
