"""The vectorised entropy threshold search returns exactly ONNX Runtime's thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import HistogramCollector

from ssdopt.quantize.entropy import entropy_threshold


def _histogram(data: np.ndarray, num_bins: int):
    collector = HistogramCollector(
        "entropy", symmetric=False, num_bins=num_bins, num_quantized_bins=128, percentile=None, scenario=None
    )
    collector.collect({"t": [data.astype(np.float32)]})
    return collector, collector.histogram_dict["t"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_threshold_as_onnxruntime(seed: int, capsys) -> None:
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.normal(0, 1, 20000), rng.standard_t(2, 300) * 5, np.zeros(3000)])
    collector, histogram = _histogram(data, 512)
    expected = collector.get_entropy_threshold(histogram, 128)
    got = entropy_threshold(histogram, 128)
    assert got[0] == expected[0] and got[1] == expected[1]
    assert got[0].dtype == expected[0].dtype


def test_relu_like_data_and_clipping_happens(capsys) -> None:
    rng = np.random.default_rng(5)
    data = np.maximum(rng.normal(0, 1, 50000), 0)
    data[:5] = 60.0  # a few outliers: the KL optimum cuts them off
    collector, histogram = _histogram(data, 1024)
    expected = collector.get_entropy_threshold(histogram, 128)
    got = entropy_threshold(histogram, 128)
    assert (got[0], got[1]) == (expected[0], expected[1])
    assert got[1] < 0.5 * data.max()
