"""A registry version that a fault left without its tags (the server failed between making the
version and tagging it) is completed by the rerun, which adds no run and no version."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_rerun_completes_a_version_left_without_its_tags(
    tiny_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from ssdopt import tracking
    from ssdopt.build import build_engine

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tracking.local_store(tmp_path / "mlflow")
    engine = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path / "engines").path

    def log() -> tuple[str, str | None]:
        return tracking.log_engine_once(
            store, "tags", engine, params={"backend": "onnxruntime"}, metrics={"p99_ms": 1.0},
            registered_model="tiny.tags",
        )  # fmt: skip

    run_id, version = log()
    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    tagged = client.get_model_version("tiny.tags", version).tags
    assert tagged["engine_sha256"] and tagged["run_id"] == run_id
    for key in tagged:
        client.delete_model_version_tag("tiny.tags", version, key)
    assert client.get_model_version("tiny.tags", version).tags == {}

    assert log() == (run_id, version)
    assert client.get_model_version("tiny.tags", version).tags == tagged
    assert len(client.search_model_versions("name='tiny.tags'")) == 1
