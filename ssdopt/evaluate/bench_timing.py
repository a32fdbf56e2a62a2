"""`ssdopt bench`'s timing beyond one row each: where the time goes (time_split), every CPU row again
in interleaved rounds (interleave), best images/s over batch sizes and streams (throughput_sweep).

Split from bench.py, which builds, measures and validates the rows these functions time again; bench
imports this module when it runs, so the names below come from a bench module already loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.backends.base import Engine, get_backend
from ssdopt.evaluate.bench import (
    BASELINE,
    FAILED_VALIDATION,
    PEER_ROUTE_NAMES,
    VALIDATED,
    BenchConfig,
    BenchContext,
    _head_batch,
    _reason,
    _torch_images,
    is_peer,
)
from ssdopt.evaluate.latency import TimingPlan, time_host


def time_split(ctx: BenchContext, cfg: BenchConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a batch's time goes on the CPU: the network alone in each runtime (the plain export,
    compiled as our fp32 engines compile it), then on that network's real head outputs (images of the
    bench set) the fused op called directly (torch.ops.ssdopt.decode_nms), torchvision's Python
    post-processing and the reference decode. Each fused fp32 engine row gets `network_p50_ms` and
    `post_in_runtime_ms` = its end to end minus its runtime's network alone (the op inside the runtime
    plus whatever the boundary costs), the median over `split_rounds` interleaved pairs with their
    range: on a shared machine, two numbers timed minutes apart differ by the load, not the op."""
    import onnxruntime as ort
    import torch

    from ssdopt.backends.base import HeadOutputs
    from ssdopt.evaluate.peers import torchvision_postprocess
    from ssdopt.ops import decode_nms

    images = _head_batch(ctx, cfg.batch)
    model = str(ctx.export_dir / "model.onnx")
    networks: dict[str, Callable[[], Any]] = {}
    options = ort.SessionOptions()
    if cfg.spec.threads:
        options.intra_op_num_threads = int(cfg.spec.threads)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    networks["onnxruntime"] = lambda: session.run(["box_deltas", "class_logits"], {"images": images})
    try:
        import openvino as ov

        from ssdopt.backends.openvino import compile_config

        compiled = ov.Core().compile_model(model, "CPU", compile_config("fp32", cfg.spec.threads))
        request = compiled.create_infer_request()
        networks["openvino"] = lambda: request.infer({0: images})
    except ImportError:
        pass
    deltas, logits = session.run(["box_deltas", "class_logits"], {"images": images})
    info = json.loads((ctx.export_dir / "export.json").read_text())
    post = info["postprocess"]
    attributes = {
        "score_threshold": float(post["score_threshold"]),
        "iou_threshold": float(post["iou_threshold"]),
        "pre_nms_top_k": int(post["pre_nms_top_k"]),
        "max_detections": int(post["max_detections"]),
        "box_weights": tuple(info["box_coder_weights"]),
        "image_height": ctx.image_size,
        "image_width": ctx.image_size,
    }
    anchors_np = np.load(ctx.export_dir / "anchors.npy")
    anchors = torch.from_numpy(anchors_np)
    d, c = torch.from_numpy(deltas), torch.from_numpy(logits)
    split: dict[str, Any] = {"batch": cfg.batch, "network_ms": {}, "candidates_above_threshold": None}
    with torch.inference_mode():
        for name, fn in networks.items():
            split["network_ms"][name] = time_host(fn, cfg.plan, cfg.batch).median_ms
        split["op_direct_ms"] = time_host(lambda: decode_nms(d, c, anchors, **attributes), cfg.plan).median_ms
        split["torchvision_post_ms"] = time_host(
            lambda: torchvision_postprocess(ctx.model, anchors, deltas, logits, ctx.image_size), cfg.plan
        ).median_ms
        split["reference_decode_ms"] = time_host(
            lambda: HeadOutputs(deltas, logits).decode(anchors_np, **attributes), cfg.plan
        ).median_ms
        scores = torch.softmax(c, dim=-1)[..., 1:]
        split["candidates_above_threshold"] = int((scores > attributes["score_threshold"]).sum()) / cfg.batch
    for row in rows:  # each fused fp32 engine against its runtime's network alone, interleaved
        network_fn = networks.get(row["backend"])
        if row["graph"] != "fused SSDDecodeNMS" or row["precision"] != "fp32" or not row.get("engine"):
            continue
        if network_fn is None:
            continue
        engine = Engine.open(Path(row["engine"]))
        runner = get_backend(engine.backend).load(engine.path)
        try:
            rounds = []
            for _ in range(cfg.split_rounds):  # alternate so the shared machine's load hits both alike
                e2e = time_host(lambda r=runner: r.infer(images), cfg.plan, cfg.batch).median_ms
                net = time_host(network_fn, cfg.plan, cfg.batch).median_ms
                rounds.append({"end_to_end_ms": e2e, "network_ms": net, "post_ms": e2e - net})
        finally:
            runner.close()
        posts = [r["post_ms"] for r in rounds]
        row["network_p50_ms"] = float(np.median([r["network_ms"] for r in rounds]))
        row["post_in_runtime_ms"] = float(np.median(posts))
        row["post_in_runtime_range_ms"] = [min(posts), max(posts)]
        row["split_rounds"] = rounds
    return split


# ---------------------------------------------------------------- interleaved rounds


def _row_timer(
    row: dict[str, Any], ctx: BenchContext, cfg: BenchConfig, batch: int | None = None
) -> tuple[Callable[[], Any], Any]:
    """(one end-to-end call, closer) re-created for a measured row: engines from their directory, peer
    routes from their cache, torchvision eager from the model in memory."""
    import torch

    cfg = replace(cfg, batch=batch or cfg.batch)

    if row.get("engine"):
        engine = Engine.open(Path(row["engine"]))
        runner = get_backend(engine.backend).load(engine.path)
        images = np.random.default_rng(0).random(
            (cfg.batch, 3, ctx.image_size, ctx.image_size), dtype=np.float32
        )
        from ssdopt.evaluate.engine import as_detections

        size = ctx.image_size
        return (lambda: as_detections(runner.infer(images), engine, size, size)), runner.close
    if (row["backend"], row["precision"]) == BASELINE:
        tensors = _torch_images(ctx.image_size, cfg.batch)
        return (lambda: ctx.model(tensors)), None
    from ssdopt.evaluate.peers import PEER_ROUTES, torchvision_postprocess

    route = PEER_ROUTES[row["backend"]](ctx.export_dir, cfg.spec.calibration, ctx.image_size, ctx.engines_dir)
    anchors = torch.from_numpy(np.load(ctx.export_dir / "anchors.npy"))
    images = np.random.default_rng(0).random((cfg.batch, 3, ctx.image_size, ctx.image_size), dtype=np.float32)
    return (lambda: torchvision_postprocess(ctx.model, anchors, *route.head(images), ctx.image_size)), None


def interleave(ctx: BenchContext, cfg: BenchConfig, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Every built CPU row (engines, peer routes, torchvision eager) timed again in `cfg.rounds` rounds,
    one after another within each round, so the shared machine's load drift hits all alike; per round,
    each row's ratio to the best peer route and to torchvision eager (median and min–max). The best peer
    and our best engine are chosen by their median over the rounds. None when rounds < 2."""
    import torch

    if cfg.rounds < 2 or cfg.device != "cpu":
        return None
    timed = [
        r
        for r in rows
        if r["status"] in (VALIDATED, FAILED_VALIDATION)
        and r["p50_ms"]
        and (
            r.get("engine") or r["backend"] in PEER_ROUTE_NAMES or (r["backend"], r["precision"]) == BASELINE
        )
    ]
    timers = [(r, *_row_timer(r, ctx, cfg)) for r in timed]
    try:
        with torch.inference_mode():
            for row, _fn, _ in timers:
                row["rounds_ms"] = []
            for _ in range(cfg.rounds):
                for row, fn, _ in timers:
                    row["rounds_ms"].append(time_host(fn, cfg.plan, cfg.batch).median_ms)
    finally:
        for _, _, close in timers:
            if close is not None:
                close()
    for row in timed:
        row["rounds_p50_ms"] = float(np.median(row["rounds_ms"]))
    peers = [r for r in timed if is_peer(r) and r["status"] == VALIDATED]
    engines = [r for r in timed if not is_peer(r) and r["status"] == VALIDATED]
    eager = next((r for r in timed if (r["backend"], r["precision"]) == BASELINE), None)
    best_peer = min(peers, key=lambda r: r["rounds_p50_ms"]) if peers else None
    summary: dict[str, Any] = {"rounds": cfg.rounds}
    for row in timed:
        for key, ref in (("vs_best_peer_rounds", best_peer), ("speedup_rounds", eager)):
            if ref is not None:
                ratios = [a / b for a, b in zip(ref["rounds_ms"], row["rounds_ms"], strict=True)]
                row[key] = ratios
                row[key.replace("_rounds", "_median")] = float(np.median(ratios))
                row[key.replace("_rounds", "_range")] = [min(ratios), max(ratios)]
    if engines:
        best = min(engines, key=lambda r: r["rounds_p50_ms"])
        summary["best_engine"] = f"{best['backend']} {best['precision']}"
        summary["best_engine_ms"] = best["rounds_p50_ms"]
        for key in ("vs_best_peer", "speedup"):
            if f"{key}_rounds" in best:
                summary[key] = {
                    "rounds": best[f"{key}_rounds"],
                    "median": best[f"{key}_median"],
                    "range": best[f"{key}_range"],
                }
    if best_peer is not None:
        summary["best_peer"] = f"{best_peer['backend']} {best_peer['precision']} ({best_peer['graph']})"
        summary["best_peer_ms"] = best_peer["rounds_p50_ms"]
    return summary


def throughput_sweep(ctx: BenchContext, cfg: BenchConfig, rows: list[dict[str, Any]]) -> None:
    """Best images/s over `cfg.throughput_batches` (one synchronous request each) for every built
    engine and, on the CPU, every peer route: `best_throughput_ips`, `best_throughput_batch` and
    `throughput_by_batch`. On the GPU only the engines are swept (one runner per engine, the batch
    resident on the GPU): torchvision eager at batch 256 would take the whole budget. On the CPU,
    `cfg.throughput_streams` then runs several requests in flight at each row's best batch."""
    if not cfg.throughput_batches and not cfg.throughput_streams:
        return
    plan = replace(cfg.plan, min_duration_s=min(cfg.plan.min_duration_s, 1.0), min_iterations=20)
    if cfg.device != "cpu":
        if cfg.throughput_batches:
            _gpu_throughput_sweep(cfg, rows, plan)
        return
    for row in rows:
        if row["status"] not in (VALIDATED, FAILED_VALIDATION) or not row["p50_ms"]:
            continue
        if not (row.get("engine") or row["backend"] in PEER_ROUTE_NAMES):
            continue
        if cfg.throughput_batches:
            _batch_sweep(row, ctx, cfg, plan)
        if cfg.throughput_streams:
            _stream_sweep(row, ctx, cfg, plan)


def _batch_sweep(row: dict[str, Any], ctx: BenchContext, cfg: BenchConfig, plan: TimingPlan) -> None:
    """images/s of one synchronous request at each of `cfg.throughput_batches`."""
    import torch

    by_batch: dict[int, float | str] = {}
    for batch in cfg.throughput_batches:
        fn, close = _row_timer(row, ctx, cfg, batch)
        try:
            with torch.inference_mode():
                by_batch[batch] = time_host(fn, plan, batch).throughput_ips
        except Exception as exc:  # noqa: BLE001 - e.g. an engine built for a smaller max batch
            by_batch[batch] = _reason(exc)
        finally:
            if close is not None:
                close()
    _set_sweep(row, by_batch)


def _stream_sweep(row: dict[str, Any], ctx: BenchContext, cfg: BenchConfig, plan: TimingPlan) -> None:
    """images/s with each of `cfg.throughput_streams` requests in flight, one runner per stream, at the
    row's best batch (ssdopt.evaluate.streams): `throughput_by_streams`; a better figure than the batch
    sweep's becomes `best_throughput_ips`, with `best_throughput_streams`."""
    import torch

    from ssdopt.evaluate.streams import concurrent_images_per_s

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():  # thread-local: set in each stream's own thread
                return fn()

        return call

    batch = int(row.get("best_throughput_batch") or cfg.batch)
    by_streams: dict[int, float | str] = {}
    timers: list[tuple[Callable[[], Any], Any]] = []
    try:  # runners for the largest stream count, loaded once; each count uses the first n of them
        for _ in range(max(cfg.throughput_streams)):
            timers.append(_row_timer(row, ctx, cfg, batch))
    except Exception as exc:  # noqa: BLE001 - counts beyond the runners that loaded report why
        load_error = _reason(exc)
    else:
        load_error = ""
    try:
        calls = [no_grad(fn) for fn, _ in timers]
        for streams in cfg.throughput_streams:
            if streams > len(calls):
                by_streams[streams] = load_error
                continue
            try:
                by_streams[streams] = concurrent_images_per_s(calls[:streams], batch, plan.min_duration_s)
            except Exception as exc:  # noqa: BLE001 - reported per stream count, the sweep goes on
                by_streams[streams] = _reason(exc)
    finally:
        for _, close in timers:
            if close is not None:
                close()
    row["throughput_streams_batch"] = batch
    row["throughput_by_streams"], errors, measured = _figures(by_streams)
    if errors:
        row["throughput_stream_errors"] = errors
    if measured:
        best = max(measured, key=lambda n: measured[n])
        if measured[best] > (row.get("best_throughput_ips") or 0.0):
            row.update(
                best_throughput_ips=measured[best], best_throughput_batch=batch, best_throughput_streams=best
            )


def _gpu_throughput_sweep(cfg: BenchConfig, rows: list[dict[str, Any]], plan: TimingPlan) -> None:
    from ssdopt.evaluate.engine import engine_throughput

    for row in rows:
        if row["status"] not in (VALIDATED, FAILED_VALIDATION) or not row.get("engine"):
            continue
        engine = Engine.open(Path(row["engine"]))
        if engine.metadata.get("device", {}).get("kind") != "cuda":
            continue  # the CPU accuracy reference: not what a GPU sweep is about
        swept = engine_throughput(engine, cfg.throughput_batches, plan)
        _set_sweep(row, {b: v if isinstance(v, str) else v.throughput_ips for b, v in swept.items()})


def _set_sweep(row: dict[str, Any], by_batch: dict[int, float | str]) -> None:
    """`throughput_by_batch` (None where a batch failed, why under `throughput_errors`) and the best."""
    row["throughput_by_batch"], errors, measured = _figures(by_batch)
    if errors:
        row["throughput_errors"] = errors
    if measured:
        best = max(measured, key=lambda b: measured[b])
        row.update(best_throughput_ips=measured[best], best_throughput_batch=int(best))


def _figures(
    values: dict[int, float | str],
) -> tuple[dict[str, float | None], dict[str, str], dict[int, float]]:
    """A sweep's results (images/s, or why it failed) as: JSON figures (None where failed), the reasons,
    and the measured figures by batch size or stream count."""
    shown = {str(k): None if isinstance(v, str) else v for k, v in values.items()}
    errors = {str(k): v for k, v in values.items() if isinstance(v, str)}
    measured = {k: v for k, v in values.items() if not isinstance(v, str) and v}
    return shown, errors, measured
