"""The CLI's help is generated from the backend registry, so it cannot drift from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssdopt.backends.registry import BACKENDS, PRECISIONS

SSDOPT = Path(sys.executable).with_name("ssdopt")


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        [str(SSDOPT), *command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


@pytest.mark.parametrize("command", [("build",), ("bench",)])
def test_help_lists_every_registered_backend_and_precision(command: tuple[str, ...]) -> None:
    text = _help(*command)
    assert " | ".join(BACKENDS) in text
    assert " | ".join(PRECISIONS) in text


def test_registry_module_imports_no_runtime() -> None:
    """The help's source must stay light: importing it pulls in no ONNX Runtime, OpenVINO or torch."""
    code = (
        "import sys, ssdopt.backends.registry; "
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_version() -> None:
    from importlib.metadata import version

    done = subprocess.run([str(SSDOPT), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"ssdopt {version('ssdopt')}", done.stdout


def test_throughput_batches_flag() -> None:
    from ssdopt.commands_eval import _batches
    from ssdopt.errors import SsdoptError

    assert _batches(None, [1, 8]) == (1, 8)
    assert _batches("1, 32,256", [1]) == (1, 32, 256)
    assert _batches("", [1, 8]) == ()
    for bad in ("0", "a,2", "-4"):
        with pytest.raises(SsdoptError, match="--throughput-batches"):
            _batches(bad, [1])
    with pytest.raises(SsdoptError, match="--throughput-streams 0"):
        _batches("0", [1], "--throughput-streams")


@pytest.mark.parametrize("flag", ["--min-iterations=0", "--min-duration-s=0", "--rounds=0"])
def test_bench_refuses_a_timing_plan_that_times_nothing(flag: str) -> None:
    done = subprocess.run(
        [str(SSDOPT), "bench", flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode != 0
    assert (
        flag.replace("=", " ") in done.stdout + done.stderr
        and "a positive number" in done.stdout + done.stderr
    )
