"""CI-sized smoke run of benchmarks/soak.py: a few build + evaluate cycles in-process finish and give
finite numbers. The memory-growth limit itself is judged on the real 50-cycle run
(benchmarks/results/soak.json), not here: a few cycles on a shared CI machine would make it flaky."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def _soak():
    name = "ssdopt_benchmarks_soak"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_soak_smoke(tiny_export, tmp_path: Path) -> None:
    soak = _soak()
    out = tmp_path / "soak.json"
    result = soak.main(["--cycles", "3", "--onnx", str(tiny_export.model), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["cycles"] == 3 and len(result["rows"]) == 3
    assert soak.all_finite(result)
    assert result["rss_after_warmup_mb"] > 0 and result["rss_end_mb"] > 0
    for row in result["rows"]:
        for backend in result["backends"]:
            assert 0.0 <= row[backend]["map"] <= 1.0 and row[backend]["p50_ms"] > 0
    assert {"machine", "date", "command"} <= result.keys()
