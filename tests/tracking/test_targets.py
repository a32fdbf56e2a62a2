"""Which deployment target an engine is registered under and which targets are promoted: one rule for
the optimize flow, the promote flow and the CLI. An explicit target (a work pool's deployment
parameter, params.yaml optimize.target, --target) wins; else the engine's own metadata; else this
machine's. Promotion without an explicit target covers every target with registered engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ssdopt.backends import device
from ssdopt.errors import SsdoptError

H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0"}


def test_explicit_target_wins_then_metadata_then_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_info", lambda: {"kind": "cpu", "flags": ["avx2"], "machine": "x86_64"})
    assert device.resolve_target("cuda-sm90", H200, "cpu") == "cuda-sm90"
    assert device.resolve_target(None, H200, "cpu") == "cuda-sm90-nvidia-h200"
    assert device.resolve_target(None, None, "cpu") == "cpu-avx2"
    assert device.resolve_target(None, {}, "cpu") == "cpu-avx2"  # no device record: this machine's


@pytest.mark.parametrize("bad", ["", "CPU AVX2", "../cpu", "cpu/avx2", "-cpu", "x" * 101])
def test_a_malformed_explicit_target_is_refused(bad: str) -> None:
    with pytest.raises(SsdoptError, match="deployment target") as info:
        device.resolve_target(bad, H200)
    assert "optimize.target" in info.value.fix


def test_optimize_rows_take_the_explicit_target_and_keep_the_engines_own() -> None:
    from flows.optimize import row_target

    built = {"device": "cpu", "status": "built", "target": "cpu-avx512-vnni"}
    assert row_target(None, built) == ("cpu-avx512-vnni", None)
    assert row_target("cpu-avx512-vnni", built) == ("cpu-avx512-vnni", None)
    assert row_target("cpu-pool-a", built) == ("cpu-pool-a", "cpu-avx512-vnni")  # flagged, not hidden
    failed = {"device": "cuda", "status": "failed", "reason": "no GPU"}
    assert row_target("cuda-sm90", failed) == ("cuda-sm90", None)
    assert row_target(None, failed) == (device.deployment_target("cuda"), None)


def test_optimize_refuses_a_malformed_target_before_building(tmp_path: Path) -> None:
    from flows.optimize import optimize

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"optimize": {"dvc_stages": ["must-not-run"]}}))
    with pytest.raises(SsdoptError, match="deployment target 'Bad Target'"):
        optimize.fn(params_file=str(params), target="Bad Target")  # no Prefect run: fails before one
    params.write_text(yaml.safe_dump({"optimize": {"dvc_stages": ["x"], "target": "cpu/../x"}}))
    with pytest.raises(SsdoptError, match="deployment target"):
        optimize.fn(params_file=str(params))  # params.yaml optimize.target goes through the same rule


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from ssdopt import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking.local_store(tmp_path / "mlflow")


def _gpu_copy(engine: Path, out: Path) -> Path:
    """The engine with metadata saying an H200 built it (and its own sha256, as a real one has)."""
    import shutil

    shutil.copytree(engine, out)
    meta = json.loads((out / "metadata.json").read_text())
    meta["device"] = H200
    meta["engine"]["sha256"] = "f" * 64
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def test_track_log_target_wins_and_promotion_covers_every_registered_target(
    tiny_export, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from ssdopt import tracking
    from ssdopt.build import build_engine

    cpu = build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path / "engines").path
    gpu = _gpu_copy(cpu, tmp_path / "gpu-engine")
    evaluation = {"map": 0.5, "delta_map": 0.0, "agreement": 1.0, "p50_ms": 1.0, "p99_ms": 2.0}

    assert tracking.promotion_targets(store, "tiny") == device.local_targets()  # nothing registered yet
    _, registered, _ = tracking.log_evaluated_engine(store, gpu, evaluation, "tiny")
    assert registered == "tiny.cuda-sm90-nvidia-h200"  # its metadata's target
    _, registered, _ = tracking.log_evaluated_engine(store, cpu, evaluation, "tiny", target="cpu-pool-a")
    assert registered == "tiny.cpu-pool-a"  # the explicit target

    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    (version,) = client.search_model_versions("name='tiny.cpu-pool-a'")
    tags = client.get_run(version.run_id).data.tags
    assert tags["ssdopt.target"] == "cpu-pool-a"
    assert tags["ssdopt.engine_target"] == device.target_of(
        json.loads((cpu / "metadata.json").read_text())["device"]
    )
    # another model whose name shares the prefix up to a LIKE wildcard is not one of ours
    client.create_registered_model("tinyXcpu-other")

    assert tracking.promotion_targets(store, "tiny") == ["cpu-pool-a", "cuda-sm90-nvidia-h200"]
    assert tracking.promotion_targets(store, "tiny", ["cuda-sm90-nvidia-h200"]) == ["cuda-sm90-nvidia-h200"]
    with pytest.raises(SsdoptError, match="deployment target"):
        tracking.promotion_targets(store, "tiny", ["Bad Target"])


def test_promote_cli_and_flow_use_the_same_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import flows.promote as promote_flow_module
    from ssdopt import cli, tracking
    from ssdopt.tracking.promotion import Decision

    seen: list[tuple[str, list[str] | None]] = []

    def targets(store, name, explicit=None):  # noqa: ANN001, ANN202 - stands in for the registry query
        seen.append((name, explicit))
        return list(explicit) if explicit else ["cpu-a", "cuda-b"]

    monkeypatch.setattr(tracking, "promotion_targets", targets)
    monkeypatch.setattr(tracking, "promote", lambda store, model, budget=1.0: Decision(model, "1", None))
    monkeypatch.setattr(
        promote_flow_module,
        "promote",
        lambda model, budget, root: {"model": model, "champion": "1", "previous": None},
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"optimize": {"model_name": "m"}}))

    out = CliRunner().invoke(cli.app, ["promote"]).output
    assert "m.cpu-a: champion v1" in out and "m.cuda-b: champion v1" in out, out
    out = CliRunner().invoke(cli.app, ["promote", "--target", "cuda-b"]).output
    assert "m.cuda-b" in out and "m.cpu-a" not in out, out
    decisions = promote_flow_module.promote_flow.fn(params_file="params.yaml")
    assert [d["model"] for d in decisions] == ["m.cpu-a", "m.cuda-b"]
    decisions = promote_flow_module.promote_flow.fn(params_file="params.yaml", targets=["cpu-a"])
    assert [d["model"] for d in decisions] == ["m.cpu-a"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"optimize": {"model_name": "m", "target": "x"}}))
    assert [d["model"] for d in promote_flow_module.promote_flow.fn(params_file="params.yaml")] == ["m.x"]
    assert "m.x" in CliRunner().invoke(cli.app, ["promote"]).output
    assert seen == [
        ("m", None), ("m", ["cuda-b"]), ("m", None), ("m", ["cpu-a"]), ("m", ["x"]), ("m", ["x"])
    ]  # fmt: skip
