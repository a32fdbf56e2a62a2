"""Fixtures for bench/detect/report tests: a tiny dataset, a tiny torchvision SSD, one bench run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest


def _helper():
    name = "ssdopt_tests_tiny_ssd"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiny_ssd.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tiny_ssd = _helper()


@pytest.fixture(scope="session")
def bench_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 val images of 64x64 (synthetic shapes, 10 classes); returns val.json."""
    from ssdopt.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("bench-data") / "synthetic"
    generate_dataset(
        out, seed=7, image_size=tiny_ssd.IMAGE_SIZE, splits={"val": 8}, workers=1, progress=False
    )
    return out / "val.json"


@pytest.fixture(scope="session")
def bench_run(bench_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick bench of the tiny SSD: peers, onnxruntime fp32, tensorrt (absent), a broken engine."""
    import shutil

    from ssdopt.build import build_engine
    from ssdopt.data.coco import load_coco
    from ssdopt.evaluate.bench import BenchConfig, export_for_bench, run_bench_model, subset
    from ssdopt.evaluate.latency import TimingPlan

    root = tmp_path_factory.mktemp("bench")
    ds = subset(load_coco(bench_dataset), 8)
    model = tiny_ssd.tiny_ssd(len(ds.class_names()))
    meta = {"model": "tiny-ssd", "class_names": ds.class_names()}
    export = export_for_bench(model, meta, None, root / "work")
    broken_dir = root / "broken"
    broken_dir.mkdir()
    for name in ("anchors.npy", "export.json"):
        shutil.copyfile(export / name, broken_dir / name)
    broken_graph = tiny_ssd.negate_class_logits(export / "model.onnx", broken_dir / "model.onnx")
    broken = build_engine("onnxruntime", "fp32", broken_graph, root / "broken-engines")
    cfg = BenchConfig(
        backends=("onnxruntime", "tensorrt"),
        precisions=("fp32",),
        limit=8,
        plan=TimingPlan.quick(),
        compile_timeout_s=0.5,
        eval_batch=4,
        extra_engines=(broken.path,),
        progress=False,
    )
    out = root / "reports"
    rows = run_bench_model(model, meta, ds, out, root / "work", cfg, command="pytest")
    return {
        "rows": rows,
        "out": out,
        "work": root / "work",
        "model": model,
        "dataset": bench_dataset,
        "engine": next(
            Path(r["engine"])
            for r in rows
            if r["graph"] == "fused SSDDecodeNMS" and r["backend"] == "onnxruntime"
        ),
    }
