"""Images/s with several requests in flight on the CPU (issue 12 item 5).

A server answers many clients at once; one synchronous request at a time leaves cores idle between
the runtime's parallel regions. Here every stream is its own runner (its own session or compiled
model, no shared request objects), called in a loop by its own thread. ONNX Runtime and OpenVINO
release the GIL while they run, so the streams share the cores the way a server's request threads do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


def concurrent_images_per_s(
    calls: Sequence[Callable[[], object]], batch: int, min_duration_s: float = 1.0, min_calls: int = 5
) -> float:
    """images/s of `calls` run concurrently, one thread each, for >= min_duration_s and >= min_calls
    calls per stream after one warm-up call each: batch x all calls / time until the last one ends."""
    if not calls:
        raise ValueError("no streams to run")
    if batch < 1 or min_duration_s <= 0 or min_calls < 1:
        raise ValueError("batch and min_calls must be >= 1, min_duration_s > 0")
    for call in calls:
        call()
    counts = [0] * len(calls)
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls) + 1)
    stop_at = [0.0]

    def stream(index: int) -> None:
        start.wait()
        try:
            while counts[index] < min_calls or time.perf_counter() < stop_at[0]:
                calls[index]()
                counts[index] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + min_duration_s
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return batch * sum(counts) / elapsed
