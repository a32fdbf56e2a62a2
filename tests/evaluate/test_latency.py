"""Latency statistics on synthetic timings, checked against numpy's own percentile definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssdopt.evaluate.latency import TimingPlan, summarize, time_host


def test_summary_matches_independent_computation() -> None:
    rng = np.random.default_rng(7)
    samples = rng.gamma(shape=4.0, scale=0.5, size=1013)
    stats = summarize(samples, batch=8)
    assert stats.iterations == 1013
    assert stats.min_ms == pytest.approx(samples.min())
    assert stats.max_ms == pytest.approx(samples.max())
    assert stats.mean_ms == pytest.approx(samples.mean())
    assert stats.median_ms == pytest.approx(np.median(samples))
    for p, got in ((90, stats.p90_ms), (95, stats.p95_ms), (99, stats.p99_ms)):
        assert got == pytest.approx(np.percentile(samples, p, method="inverted_cdf"))
    assert stats.cv == pytest.approx(samples.std(ddof=1) / samples.mean())
    assert stats.throughput_ips == pytest.approx(8 * 1000 / np.median(samples))


def test_nearest_rank_on_a_constructed_case() -> None:
    samples = list(range(1, 101))  # 1..100 ms
    stats = summarize(samples)
    assert (stats.p90_ms, stats.p95_ms, stats.p99_ms) == (90, 95, 99)
    assert stats.median_ms == 50.5
    assert summarize([5.0]).cv == 0.0


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [1.0, -2.0], [math.inf]])
def test_bad_samples_rejected(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_time_host_respects_the_plan_with_a_fake_clock() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    calls = [0]

    def work() -> None:
        calls[0] += 1
        now[0] += 0.002  # each call costs 2 ms of fake time

    plan = TimingPlan(warmup_s=0.2, min_duration_s=1.0, min_iterations=50)
    stats = time_host(work, plan, batch=1, clock=clock)
    # warm-up 100 calls, then 1 s of 2 ms calls = 500 iterations (> min 50)
    assert 495 <= stats.iterations <= 505
    assert stats.median_ms == pytest.approx(2.0)
    assert calls[0] >= 100 + stats.iterations
