"""ssdopt bench on a tiny SSD: honest status per row, the JSON schema, Markdown and the Pareto PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssdopt.evaluate.bench import FAILED_BUILD, FAILED_VALIDATION, VALIDATED, subset
from ssdopt.evaluate.bench_output import pareto_front

REQUIRED = (
    "backend",
    "precision",
    "device",
    "batch",
    "p50_ms",
    "p99_ms",
    "throughput_ips",
    "speedup",
    "map",
    "delta_map",
)


def _row(rows, backend, graph_prefix=""):
    return next(r for r in rows if r["backend"] == backend and r["graph"].startswith(graph_prefix))


def test_status_legend(bench_run) -> None:
    rows = bench_run["rows"]
    assert [r["backend"] for r in rows[:2]] == ["torch-eager", "torch-compile"]
    eager = _row(rows, "torch-eager")
    assert eager["status"] == VALIDATED and eager["speedup"] == pytest.approx(1.0)
    compiled = _row(rows, "torch-compile")
    assert compiled["status"] == FAILED_BUILD and "checkpoint file" in compiled["reason"]
    reference = _row(rows, "onnxruntime", "head")
    assert reference["status"] == VALIDATED and reference["delta_map"] == 0 and reference["agreement"] == 1.0
    fused = _row(rows, "onnxruntime", "fused")
    assert fused["status"] == VALIDATED and fused["agreement"] >= 0.9, fused
    trt = _row(rows, "tensorrt")
    assert trt["status"] == FAILED_BUILD and "tensorrt" in trt["reason"] and trt["p50_ms"] is None
    broken = _row(rows, "onnxruntime", "engine")
    assert broken["status"] == FAILED_VALIDATION and "agreement" in broken["reason"], broken
    assert broken["agreement"] < 0.5


def test_eager_agrees_with_engines(bench_run) -> None:
    """torchvision's own post-processing and the fused op on the same weights: the same detections."""
    eager = _row(bench_run["rows"], "torch-eager")
    assert eager["agreement"] >= 0.9 and abs(eager["delta_map"]) <= 1.0


def test_json_schema_and_files(bench_run) -> None:
    out = bench_run["out"]
    rows = json.loads((out / "bench.json").read_text())
    assert isinstance(rows, list) and len(rows) == len(bench_run["rows"]) == 6
    for row in rows:
        assert set(REQUIRED) <= set(row)
        assert row["batch"] == 1 and isinstance(row["device"], str)
        if row["status"] != FAILED_BUILD:
            assert row["p99_ms"] >= row["p50_ms"] > 0 and row["throughput_ips"] > 0
            assert row["latency"]["iterations"] >= 20
    md = (out / "bench.md").read_text()
    assert "| backend | precision |" in md and "pytest" in md and md.count("\n| ") >= 7
    assert "❎" in md and "❌" in md and "✅" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_pareto_front_is_nondominated() -> None:
    rows = [
        {"p50_ms": 10.0, "map": 0.5},
        {"p50_ms": 2.0, "map": 0.4},
        {"p50_ms": 3.0, "map": 0.3},
        {"p50_ms": 1.0, "map": 0.1},
        {"p50_ms": None, "map": 0.9},
        {"p50_ms": 12.0, "map": 0.5},
    ]
    front = pareto_front(rows)
    assert [(r["p50_ms"], r["map"]) for r in front] == [(1.0, 0.1), (2.0, 0.4), (10.0, 0.5)]


def test_missing_annotations_is_an_error(bench_dataset) -> None:
    from ssdopt.data.coco import load_coco
    from ssdopt.errors import SsdoptError

    ds = load_coco(bench_dataset)
    ds.annotations = []
    with pytest.raises(SsdoptError, match="annotations"):
        subset(ds, 4)


def _quick_bench(bench_run, out, **overrides):  # noqa: ANN001, ANN202
    from ssdopt.data.coco import load_coco
    from ssdopt.evaluate.bench import BenchConfig, run_bench_model
    from ssdopt.evaluate.latency import TimingPlan

    ds = subset(load_coco(bench_run["dataset"]), 8)
    meta = {"model": "tiny-ssd", "class_names": ds.class_names()}
    settings = {
        "backends": ("onnxruntime",),
        "precisions": ("fp32",),
        "peers": ("torch-eager",),  # no onnxruntime-fp32 asked for
        "limit": 8,
        "plan": TimingPlan.quick(),
        "eval_batch": 4,
        "progress": False,
        **overrides,
    }
    return run_bench_model(bench_run["model"], meta, ds, out, bench_run["work"], BenchConfig(**settings))


def test_the_reference_is_measured_even_when_not_asked_for(bench_run, tmp_path) -> None:
    rows = _quick_bench(bench_run, tmp_path / "reports")
    reference = _row(rows, "onnxruntime", "head")
    assert reference["status"] == VALIDATED and reference["delta_map"] == 0
    fused = _row(rows, "onnxruntime", "fused")
    assert fused["status"] == VALIDATED and fused["delta_map"] is not None, fused


def test_no_reference_means_not_validated_never_a_check_mark(bench_run, tmp_path, monkeypatch) -> None:
    from ssdopt.evaluate import bench
    from ssdopt.evaluate.bench import NOT_VALIDATED

    real = bench.engine_row

    def reference_fails(backend, precision, graph_path, ctx, cfg, graph, device=None):  # noqa: ANN001, ANN202
        if graph.startswith("head"):
            row = bench._row(backend, precision, graph, "cpu", cfg.batch)
            row["reason"] = "simulated build failure"
            return row
        return real(backend, precision, graph_path, ctx, cfg, graph, device)

    monkeypatch.setattr(bench, "engine_row", reference_fails)
    rows = _quick_bench(bench_run, tmp_path / "reports")
    assert _row(rows, "onnxruntime", "head")["status"] == FAILED_BUILD
    for row in (_row(rows, "onnxruntime", "fused"), _row(rows, "torch-eager")):
        assert row["status"] == NOT_VALIDATED and row["delta_map"] is None, row
        assert "no ONNX Runtime fp32 reference: simulated build failure" in row["reason"]
    md = (tmp_path / "reports" / "bench.md").read_text()
    assert "✅" not in md.split("| backend |", 1)[1] and "❔" in md


def test_gpu_plan_keeps_the_accuracy_reference_on_the_cpu(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """`bench --device cuda`: engines and torch peers on the GPU, every torch.compile mode asked for
    as its own row, the ONNX Runtime fp32 reference on the CPU (GPU ΔmAP is against the CPU fp32)."""
    import ssdopt.evaluate.bench as bench
    from ssdopt.errors import SsdoptError

    calls = []
    record = lambda *a: calls.append(("engine", a[0], a[1], a[6] if len(a) > 6 else None))  # noqa: E731
    monkeypatch.setattr(bench, "engine_row", record)
    monkeypatch.setattr(bench, "compile_row", lambda ctx, cfg, peer: calls.append(("compile", peer)))
    cfg = bench.BenchConfig(
        backends=("torch-aoti",),
        precisions=("fp16",),
        peers=("torch-compile-reduce-overhead", "torch-compile-max-autotune"),
        device="cuda",
    )
    ctx = bench.BenchContext(None, None, tmp_path, tmp_path / "nms.onnx", tmp_path, 64)  # type: ignore[arg-type]
    for _, job in bench.plan_rows(ctx, cfg):
        job()
    assert ("compile", "torch-compile-reduce-overhead") in calls and (
        "compile",
        "torch-compile-max-autotune",
    ) in calls
    assert ("engine", "onnxruntime", "fp32", "cpu") in calls and (
        "engine",
        "torch-aoti",
        "fp16",
        None,
    ) in calls
    with pytest.raises(SsdoptError, match="one of cpu, cuda"):
        bench.BenchConfig(device="gpu")


class _Pipe:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:  # noqa: ANN001
        self.sent.append(message)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_network_compile_peer_compiles_backbone_and_head_only(bench_dataset, monkeypatch, mode) -> None:
    """torch-compile-network-*: torchvision's SSD with its backbone and head compiled in place (what a
    user falls back to when the whole detector does not compile), anchors and post-processing eager;
    reduce-overhead marks a CUDA-graph step per call. torch.compile is recorded, not run."""
    import torch

    import ssdopt.evaluate.bench as bench
    from ssdopt.evaluate.latency import TimingPlan

    compiled, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: compiled.append((type(m).__name__, mode)) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    cfg = bench.BenchConfig(plan=TimingPlan.quick(), eval_batch=2, progress=False)
    pipe = _Pipe()
    checkpoint = Path(__file__).parents[2] / "data/reference/ssdlite320_shapes.safetensors"
    bench._compile_child(str(checkpoint), str(bench_dataset), 2, cfg, pipe, mode, "network")
    (result,) = pipe.sent
    assert result["ok"], result
    assert [name for name, _ in compiled] == ["SSDLiteFeatureExtractorMobileNet", "SSDLiteHead"]
    assert {m for _, m in compiled} == {mode} and result["detections"]
    assert (len(steps) > 0) == (mode == "reduce-overhead")
    assert bench.COMPILE_PEERS["torch-compile-network-" + (mode or "max-autotune")][1] == "network"


def test_unknown_peer_is_refused() -> None:
    from ssdopt.errors import SsdoptError
    from ssdopt.evaluate.bench import BenchConfig

    with pytest.raises(SsdoptError, match="torch-compile-network-reduce-overhead"):
        BenchConfig(peers=("torch-eager", "torch-compile-netwrk"))
