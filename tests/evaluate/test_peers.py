"""Peer routes of `ssdopt bench`: torchvision post-processing as the truth, and each route built from
the plain export, calibrated on the same calibration set, scored by pycocotools like every engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ssdopt.evaluate.bench import VALIDATED, BenchConfig, run_bench_model, subset
from ssdopt.evaluate.peers import PEER_ROUTES, torchvision_postprocess


def test_torchvision_postprocess_matches_the_reference_decode(bench_run) -> None:
    """Two independent implementations of the same semantics: torchvision's own SSD code vs ours."""
    from ssdopt.ops.reference import reference_decode_nms

    model = bench_run["model"].eval()
    export = bench_run["work"] / "onnx"
    anchors = torch.from_numpy(np.load(export / "anchors.npy"))
    rng = np.random.default_rng(3)
    deltas = rng.normal(0, 0.5, (2, anchors.shape[0], 4)).astype(np.float32)
    from ssdopt.data.coco import load_coco

    classes = len(load_coco(bench_run["dataset"]).class_names())
    logits = rng.normal(0, 2.0, (2, anchors.shape[0], classes))
    logits = logits.astype(np.float32)
    size = 64
    with torch.inference_mode():
        ours = torchvision_postprocess(model, anchors, deltas, logits, size)
    num, boxes, scores, _ = reference_decode_nms(
        torch.from_numpy(deltas),
        torch.from_numpy(logits),
        anchors,
        score_threshold=model.score_thresh,
        iou_threshold=model.nms_thresh,
        pre_nms_top_k=model.topk_candidates,
        max_detections=model.detections_per_img,
        image_height=size,
        image_width=size,
    )
    assert ours.num_detections.tolist() == num.tolist() and num.min() > 0
    for i in range(2):
        n = int(num[i])
        assert np.allclose(np.sort(ours.scores[i, :n]), np.sort(scores[i, :n].numpy()), atol=1e-5)
        assert np.allclose(np.sort(ours.boxes[i, :n].sum(1)), np.sort(boxes[i, :n].sum(1).numpy()), atol=1e-3)
        assert (ours.labels[i, n:] == -1).all()


@pytest.fixture(scope="module")
def peer_rows(bench_run, tiny_calibration, tmp_path_factory):  # noqa: ANN001, ANN201
    from ssdopt.data.coco import load_coco
    from ssdopt.evaluate.latency import TimingPlan

    ds = subset(load_coco(bench_run["dataset"]), 8)
    meta = {"model": "tiny-ssd", "class_names": ds.class_names()}
    base = BenchConfig()
    cfg = BenchConfig(
        backends=("onnxruntime",),
        precisions=("fp32",),
        peers=("torch-eager", *PEER_ROUTES),
        limit=8,
        plan=TimingPlan.quick(),
        eval_batch=4,
        progress=False,
        rounds=2,
        throughput_batches=(1, 2),
        throughput_streams=(1, 2),
        spec=replace(base.spec, calibration=replace(base.spec.calibration, directory=tiny_calibration)),
    )
    out = tmp_path_factory.mktemp("peer-reports")
    return run_bench_model(bench_run["model"], meta, ds, out, bench_run["work"], cfg), out


@pytest.mark.parametrize("name", list(PEER_ROUTES))
def test_peer_route_is_measured_and_audited(peer_rows, name) -> None:  # noqa: ANN001
    rows, out = peer_rows
    row = next(r for r in rows if r["backend"] == name)
    assert row["status"] != "❌", row["reason"]
    assert row["map"] is not None and row["delta_map"] is not None and row["agreement"] is not None
    assert row["p99_ms"] >= row["p50_ms"] > 0 and 0 < row["network_p50_ms"]
    assert row["peer"]["calibration"]["images_used"] > 0
    assert row["vs_best_peer"] is not None and row["best_peer"]
    assert name in (out / "bench.md").read_text()


def test_best_peer_ratio_is_against_the_fastest_validated_peer(peer_rows) -> None:  # noqa: ANN001
    from ssdopt.evaluate.bench import is_peer

    rows, _ = peer_rows
    peers = [r for r in rows if is_peer(r) and r["status"] == VALIDATED]
    best = min(peers, key=lambda r: r["p50_ms"])
    assert best["vs_best_peer"] == pytest.approx(1.0)
    for row in rows:
        if row["p50_ms"]:
            assert row["vs_best_peer"] == pytest.approx(best["p50_ms"] / row["p50_ms"])


def test_missing_calibration_set_is_a_failed_row_with_the_fix(bench_run, tmp_path) -> None:
    from ssdopt.evaluate import bench

    base = BenchConfig()
    cfg = replace(
        base, spec=replace(base.spec, calibration=replace(base.spec.calibration, directory=tmp_path))
    )
    ctx = bench.BenchContext(
        bench_run["model"],
        None,
        bench_run["work"] / "onnx",
        tmp_path,
        tmp_path,
        64,  # type: ignore[arg-type]
    )
    row = bench.peer_route_row(ctx, cfg, "openvino-nncf")
    assert row["status"] == bench.FAILED_BUILD and "dvc repro calibration" in row["reason"]


def test_time_split_is_in_the_outputs(peer_rows) -> None:  # noqa: ANN001
    """Network alone per runtime, the op directly, torchvision's post-processing: all measured, all in
    bench_context.json and bench.md; a fused fp32 row's own share is its end to end minus its network."""
    import json

    rows, out = peer_rows
    split = json.loads((out / "bench_context.json").read_text())["split"]
    assert split["network_ms"]["onnxruntime"] > 0
    assert split["op_direct_ms"] > 0 and split["torchvision_post_ms"] > 0 and split["reference_decode_ms"] > 0
    fused = next(r for r in rows if r["graph"] == "fused SSDDecodeNMS" and r["backend"] == "onnxruntime")
    posts = [r["end_to_end_ms"] - r["network_ms"] for r in fused["split_rounds"]]
    assert len(posts) == 3 and fused["post_in_runtime_ms"] == pytest.approx(float(np.median(posts)))
    assert fused["post_in_runtime_range_ms"] == pytest.approx([min(posts), max(posts)])
    assert "## Where the time goes" in (out / "bench.md").read_text()


def test_interleaved_rounds_give_per_round_ratios(peer_rows) -> None:  # noqa: ANN001
    import json

    from ssdopt.evaluate.bench import PEER_ROUTE_NAMES

    assert PEER_ROUTE_NAMES == tuple(PEER_ROUTES)
    rows, out = peer_rows
    summary = json.loads((out / "bench_context.json").read_text())["interleaved"]
    timed = [r for r in rows if r.get("rounds_ms")]
    assert {r["backend"] for r in timed} >= {"torch-eager", "onnxruntime", *PEER_ROUTES}
    best_peer = next(
        r for r in timed if summary["best_peer"].startswith(f"{r['backend']} {r['precision']} (")
    )
    for row in timed:
        assert len(row["rounds_ms"]) == 2
        expected = [a / b for a, b in zip(best_peer["rounds_ms"], row["rounds_ms"], strict=True)]
        assert row["vs_best_peer_rounds"] == pytest.approx(expected)
        assert row["vs_best_peer_range"] == pytest.approx([min(expected), max(expected)])
    assert (
        summary["vs_best_peer"]["median"] > 0
        and "## Interleaved rounds (2)" in (out / "bench.md").read_text()
    )


def test_best_throughput_over_batch_sizes(peer_rows) -> None:  # noqa: ANN001
    rows, _ = peer_rows
    swept = [r for r in rows if r.get("throughput_by_batch")]
    assert {r["backend"] for r in swept} >= {"onnxruntime", *PEER_ROUTES}
    for row in swept:
        measured = {int(b): v for b, v in row["throughput_by_batch"].items() if v}
        assert set(measured) == {1, 2}, row.get("throughput_errors")
        if "best_throughput_streams" not in row:  # else the stream sweep's figure won (test below)
            assert row["best_throughput_ips"] == max(measured.values())
            assert measured[row["best_throughput_batch"]] == row["best_throughput_ips"]
        else:
            assert row["best_throughput_ips"] > max(measured.values())


def test_streams_are_swept_at_the_best_batch(peer_rows) -> None:  # noqa: ANN001
    """Engines and peer routes: images/s with 1 and 2 requests in flight, at the batch the batch sweep
    found best; the best figure over batches and streams is the row's best_throughput_ips."""
    rows, out = peer_rows
    swept = [r for r in rows if r.get("throughput_by_streams")]
    assert {r["backend"] for r in swept} >= {"onnxruntime", *PEER_ROUTES}
    for row in swept:
        assert set(row["throughput_by_streams"]) == {"1", "2"}, row.get("throughput_stream_errors")
        assert all(v and v > 0 for v in row["throughput_by_streams"].values())
        assert row["throughput_streams_batch"] in (1, 2)
        best = max([*row["throughput_by_batch"].values(), *row["throughput_by_streams"].values()])
        assert row["best_throughput_ips"] == pytest.approx(best)
