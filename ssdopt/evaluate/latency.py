"""Latency measurement in the manner of trtexec: time-based warm-up, then a duration or count.

The statistics are separated from the clock so they can be tested on synthetic timings, and
so every backend reports the same numbers the same way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies in milliseconds (batch `batch` per iteration)."""

    iterations: int
    batch: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    cv: float  # coefficient of variation: std / mean
    throughput_ips: float  # images per second at the median latency
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: np.ndarray | list[float], batch: int = 1) -> LatencyStats:
    """Percentiles use the nearest-rank definition (as trtexec reports them), not interpolation."""
    values = np.sort(np.asarray(samples_ms, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no latency samples")
    if not np.all(np.isfinite(values)) or values[0] < 0:
        raise ValueError("latency samples must be finite and non-negative")
    if batch < 1:
        raise ValueError("batch must be >= 1")

    def rank(p: float) -> float:
        index = max(0, math.ceil(p / 100.0 * values.size) - 1)
        return float(values[index])

    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    median = float(np.median(values))
    return LatencyStats(
        iterations=int(values.size),
        batch=batch,
        min_ms=float(values[0]),
        mean_ms=mean,
        median_ms=median,
        p90_ms=rank(90),
        p95_ms=rank(95),
        p99_ms=rank(99),
        max_ms=float(values[-1]),
        cv=std / mean if mean > 0 else 0.0,
        throughput_ips=batch * 1000.0 / median if median > 0 else math.inf,
    )


@dataclass(frozen=True)
class TimingPlan:
    """trtexec-like defaults: >= 200 ms warm-up, then >= 3 s and >= 200 iterations."""

    warmup_s: float = 0.2
    min_duration_s: float = 3.0
    min_iterations: int = 200
    max_iterations: int = 100_000

    @classmethod
    def quick(cls) -> TimingPlan:
        """For CI and tests: statistics still meaningful, seconds not minutes."""
        return cls(warmup_s=0.05, min_duration_s=0.2, min_iterations=20)


def time_host(
    fn: Callable[[], object],
    plan: TimingPlan = TimingPlan(),
    batch: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time a synchronous callable (CPU runtimes; GPU callers synchronise inside `fn`)."""
    start = clock()
    while clock() - start < plan.warmup_s:
        fn()
    samples: list[float] = []
    begin = clock()
    while len(samples) < plan.max_iterations and (
        len(samples) < plan.min_iterations or clock() - begin < plan.min_duration_s
    ):
        t0 = clock()
        fn()
        samples.append((clock() - t0) * 1000.0)
    stats = summarize(samples, batch)
    return LatencyStats(**{**stats.as_dict(), "extra": {"threads": cpu_threads(), "clock": "host"}})


def time_cuda(fn: Callable[[], object], plan: TimingPlan = TimingPlan(), batch: int = 1) -> LatencyStats:
    """Time GPU work with CUDA events around each call (fn enqueues work on the current stream)."""
    import torch

    start = time.perf_counter()
    while time.perf_counter() - start < plan.warmup_s:
        fn()
    torch.cuda.synchronize()
    pairs = []
    begin = time.perf_counter()
    while len(pairs) < plan.max_iterations and (
        len(pairs) < plan.min_iterations or time.perf_counter() - begin < plan.min_duration_s
    ):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        pairs.append((e0, e1))
        if len(pairs) % 64 == 0:
            e1.synchronize()
    torch.cuda.synchronize()
    stats = summarize([a.elapsed_time(b) for a, b in pairs], batch)
    return LatencyStats(**{**stats.as_dict(), "extra": {"clock": "cuda-events"}})


def cpu_threads() -> int:
    """Threads the process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
