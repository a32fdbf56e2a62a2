"""`dvc repro` of the whole dvc.yaml on a tiny project, offline: every stage's outputs, dvc.lock md5s
checked against the bytes, a second repro that does nothing, and a calibration-method change that
invalidates exactly the int8 branch."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8")
DVC = Path(sys.executable).with_name("dvc")

pytestmark = pytest.mark.skipif(not DVC.exists() and shutil.which("dvc") is None, reason="dvc not installed")


def _tiny_model():
    name = "ssdopt_tests_tiny_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "backends" / "tiny_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _params() -> dict:
    return {
        "model": {
            "name": "tiny",
            "checkpoint": "data/reference/ssdlite320_shapes.safetensors",
            "image_size": 64,
        },
        "generate": {"seed": 5, "image_size": 64, "train": 16, "val": 6, "test": 2, "out": "data/synthetic"},
        "calibration": {"num_images": 8, "strategy": "random", "seed": 0, "out": "data/calibration"},
        "export": {"opset": 18, "out": "artifacts/onnx", "tolerance": 1.0e-4},
        "quantize": {"calibration_method": "minmax"},
        "build": {
            "onnx": "artifacts/onnx/model.onnx",  # the tiny export has no SSDDecodeNMS node
            "device": "cpu",
            "max_batch": 8,
            "threads": 1,
            "calibration": {"directory": "data/calibration", "method": "minmax"},
            "int8_quantizer": "auto",
            "int8_latency_probe": False,
            "performance_hint": "LATENCY",
        },
        "optimize": {
            "split": "val",
            "eval_images": 6,
            "timing": {"warmup_s": 0.01, "min_duration_s": 0.05, "min_iterations": 5},
            "map_budget": 100.0,
            "min_agreement": 0.0,
        },
    }


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(project),
    }
    command = [str(DVC) if DVC.exists() else "dvc", *args]
    proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture()
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """dvc.yaml + ssdopt sources + tiny params; the export stage committed from the tiny export."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(ROOT / "ssdopt", root / "ssdopt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copyfile(ROOT / ".dvcignore", root / ".dvcignore")  # __pycache__ the stages write is no change
    (root / "params.yaml").write_text(yaml.safe_dump(_params(), sort_keys=False))
    tiny = _tiny_model().cached_export(request.config)
    onnx_dir = root / "artifacts" / "onnx"
    onnx_dir.mkdir(parents=True)
    for name in ("model.onnx", "model_unfolded.onnx", "anchors.npy", "export.json"):
        shutil.copyfile(tiny.directory / name, onnx_dir / name)
    reference = root / "data" / "reference" / "ssdlite320_shapes.safetensors"
    reference.parent.mkdir(parents=True)
    reference.write_bytes(b"tiny stand-in: the export stage is committed, not run")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    _dvc(root, "config", "core.analytics", "false")
    _dvc(root, "commit", "-f", "export")  # a real export of ssdlite320 takes minutes on 2 cores
    return root


def _check_lock(root: Path) -> dict:
    """Every out in dvc.lock: file md5 = md5 of its bytes; dir md5 = the cached listing whose entries
    match the files on disk one to one."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    cache = root / ".dvc" / "cache" / "files" / "md5"
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            if out["md5"].endswith(".dir"):
                digest = out["md5"][: -len(".dir")]
                listing = json.loads((cache / digest[:2] / (digest[2:] + ".dir")).read_text())
                on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
                assert {e["relpath"] for e in listing} == on_disk, out["path"]
                for entry in listing:
                    assert _md5(path / entry["relpath"]) == entry["md5"], f"{out['path']}/{entry['relpath']}"
            else:
                assert _md5(path) == out["md5"], out["path"]
    return lock


def test_dvc_repro_runs_every_stage_then_nothing(project: Path) -> None:
    first = _dvc(project, "repro")
    for stage in ("generate", "calibration", "quantize@int8", "build@openvino-int8", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout[-2000:]
    assert "Running stage 'export'" not in first.stdout

    for precision in ("fp16", "int8"):
        assert (project / "artifacts" / "quantized" / precision / "model.onnx").is_file()
        assert (project / "artifacts" / "quantized" / precision / "anchors.npy").is_file()
    record = json.loads((project / "artifacts" / "quantized" / "int8" / "quantize.json").read_text())
    assert record["calibration"]["method"] == "minmax" and record["quantization"]["quantized_nodes"]
    lock = _check_lock(project)
    for name in ENGINES:
        meta = json.loads((project / "artifacts" / "engines" / name / "metadata.json").read_text())
        assert f"{meta['backend']}-{meta['precision']}" == name
        if name == "onnxruntime-int8":
            assert meta["quantization"]["prequantized"] is True  # built from quantize@int8, not re-quantized
        if name == "openvino-int8":  # NNCF on the OpenVINO model, calibrated on the DVC set
            assert meta["quantization"]["tool"].startswith("nncf.quantize")
            assert meta["calibration"]["dvc_md5"] == lock["stages"]["calibration"]["outs"][0]["md5"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(metrics) == set(ENGINES)
    assert metrics["onnxruntime-fp32"]["delta_map"] == 0.0
    assert metrics["onnxruntime-fp32"]["agreement"] in (1.0, None)  # itself, or n/a: nothing confident
    for values in metrics.values():
        assert 0.0 <= values["map"] <= 1.0 and values["p99_ms"] >= values["p50_ms"] > 0
    pareto = json.loads((project / "reports" / "pareto.json").read_text())
    assert {p["engine"] for p in pareto} == set(ENGINES)
    assert "<html" in (project / "reports" / "index.html").read_text().lower()

    assert set(lock["stages"]) >= {f"build@{name}" for name in ENGINES} | {"quantize@fp16", "report"}
    lock_text = (project / "dvc.lock").read_text()

    second = _dvc(project, "repro")
    assert "Running stage" not in second.stdout and "up to date" in second.stdout, second.stdout
    assert (project / "dvc.lock").read_text() == lock_text

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["quantize"]["calibration_method"] = "percentile"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_dvc(project, "status", "--json").stdout)
    assert "quantize@int8" in status and "build@onnxruntime-fp32" not in status
    assert not {"generate", "calibration", "export"} & set(status)


MAIN_JOB_STAGES = ("generate", "calibration", "export")  # what `make run` reproduces through DVC


def test_committed_lock_matches_the_sources_of_the_main_job() -> None:
    """A dvc.lock that records other bytes for a source file than the tree holds makes the first
    `make run` of every fresh clone rerun the stage and leave dvc.lock modified (and, with autostage,
    staged). Fix when this fails: `make repro` (or `.venv/bin/dvc repro export`) and commit dvc.lock."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    stale = []
    for stage in MAIN_JOB_STAGES:
        for dep in lock[stage]["deps"]:
            if dep["path"] in tracked:  # source files and the reference checkpoint, not generated data
                digest = hashlib.md5((ROOT / dep["path"]).read_bytes()).hexdigest()
                if digest != dep["md5"]:
                    stale.append(f"{stage}: {dep['path']}")
    assert not stale, f"dvc.lock is stale for {stale}"
