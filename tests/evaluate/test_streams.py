"""ssdopt.evaluate.streams: requests in flight, one thread each."""

from __future__ import annotations

import threading
import time

import pytest

from ssdopt.evaluate.streams import concurrent_images_per_s


def test_streams_overlap_calls_that_release_the_gil() -> None:
    """time.sleep releases the GIL as the runtimes do: two streams of 20 ms calls get about twice the
    images/s of one (each stream counts its calls; batch multiplies)."""
    one = concurrent_images_per_s([lambda: time.sleep(0.02)], batch=4, min_duration_s=0.3)
    two = concurrent_images_per_s([lambda: time.sleep(0.02)] * 2, batch=4, min_duration_s=0.3)
    assert 100 < one < 210 and two > 1.5 * one


def test_every_stream_runs_in_its_own_thread_and_counts() -> None:
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def call() -> None:
        with lock:
            seen[threading.get_ident()] = seen.get(threading.get_ident(), 0) + 1

    concurrent_images_per_s([call, call, call], batch=1, min_duration_s=0.05, min_calls=7)
    workers = {k: v for k, v in seen.items() if k != threading.get_ident()}
    assert len(workers) == 3 and min(workers.values()) >= 7


def test_a_failing_stream_raises_in_the_caller() -> None:
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("runner broke")

    with pytest.raises(RuntimeError, match="runner broke"):
        concurrent_images_per_s([flaky], batch=1, min_duration_s=0.05)


@pytest.mark.parametrize("kwargs", [{"calls": []}, {"batch": 0}, {"min_duration_s": 0}])
def test_bad_arguments_are_refused(kwargs) -> None:  # noqa: ANN001
    args = {"calls": [lambda: None], "batch": 1, "min_duration_s": 0.1, **kwargs}
    with pytest.raises(ValueError):
        concurrent_images_per_s(**args)
