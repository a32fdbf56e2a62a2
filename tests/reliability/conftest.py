"""Helpers for the bad-input matrix: run the real CLI entry point in-process, check a refusal, snapshot
a working directory, and record each case's observed message.

Recording: with SSDOPT_RECORD_CASES=<path.md> set, every refusal checked through `refused` (and every
accepted-input case through `record`) is collected and written at the end of the session as a Markdown
table (tests/reliability/CASES.md is generated this way; see its header for the command).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ssdopt.errors import SsdoptError

RECORD_ENV = "SSDOPT_RECORD_CASES"
_RECORDED: list[dict[str, str]] = []


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str
    command: str


def record(case: str, trigger: str, code: int | str, message: str) -> None:
    """Remember one observed case for CASES.md (no-op unless SSDOPT_RECORD_CASES is set)."""
    if os.environ.get(RECORD_ENV):
        _RECORDED.append({"case": case, "trigger": trigger, "code": str(code), "message": message.strip()})


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(RECORD_ENV)
    if not target or not _RECORDED:
        return
    rows = sorted({(r["case"], r["trigger"], r["code"], r["message"]) for r in _RECORDED})
    lines = [
        "# Bad-input and integrity cases (generated)",
        "",
        "Observed by tests/reliability/test_bad_*.py and test_integrity.py; do not edit by hand.",
        "Regenerate: `SSDOPT_RECORD_CASES=tests/reliability/CASES.md .venv/bin/pytest "
        "tests/reliability/test_bad_*.py tests/reliability/test_integrity.py`.",
        "Exit code 2 is the CLI's code for a refused input (SsdoptError); `API` rows raise SsdoptError "
        "(exit code 2 at the CLI boundary); `0` rows are inputs that are accepted by a documented rule.",
        "Temporary folders show as `<tmp>`, the cached tiny export as `<tiny-export>`, digests as "
        "`<sha256>`.",
        "",
        "| # | case | triggered by | exit | observed message |",
        "|---|---|---|---|---|",
    ]
    for index, (case, trigger, code, message) in enumerate(rows, start=1):
        lines.append(f"| {index} | {_cell(case)} | `{_cell(trigger)}` | {code} | {_cell(message)} |")
    Path(target).write_text("\n".join(lines) + "\n", encoding="utf-8")


_REPO = Path(__file__).resolve().parents[2]
_VOLATILE = (
    (re.compile(r"\S*/\.pytest_cache/d/ssdopt-tiny-export-[0-9a-f]+"), "<tiny-export>"),
    (re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+"), "<tmp>"),
    (re.compile(r"\b[0-9a-f]{16,64}(\.\.\.)?"), "<sha256>"),
)


def _scrub(text: str) -> str:
    """Stable text for CASES.md: temporary folders, the cached tiny export and hex digests replaced."""
    for pattern, placeholder in _VOLATILE:
        text = pattern.sub(placeholder, text)
    return text.replace(str(_REPO) + "/", "")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory (no params.yaml of the repo, outputs land here), and a clean
    environment for the variables that steer library and limit lookups."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in (
        "SSDOPT_MAX_ONNX_MB",
        "SSDOPT_MAX_ONNX_NODES",
        "SSDOPT_NMS_CPU_LIBRARY",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    return work


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (folders too) -> (size, mtime_ns): what "no partial artifact and no
    change to the registry" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        out[str(path.relative_to(root))] = (0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Run `ssdopt ARGS` through ssdopt.cli.main (the console-script entry point) in this process."""
    from ssdopt.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["ssdopt", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err, "ssdopt " + " ".join(args))

    return run


@pytest.fixture
def cli_process() -> Callable[..., CliResult]:
    """Run the installed `ssdopt` console script in a child process in the current directory: proves
    the exit code a shell sees."""
    import subprocess

    script = Path(sys.executable).with_name("ssdopt")

    def run(*args: str) -> CliResult:
        proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=180)
        return CliResult(proc.returncode, proc.stdout, proc.stderr, "ssdopt " + " ".join(args))

    return run


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, tuple[int, int]]]:
    """`snapshot(root)`: every path under root with size and mtime (see `tree`)."""
    return tree


@pytest.fixture
def refused(request: pytest.FixtureRequest) -> Callable[..., str]:
    """`refused(result, *mentions, root=, before=)`: assert a clean refusal: exit code 2, one
    `error: <thing>: expected <...>. Fix: <...>` message mentioning each of `mentions`, no traceback;
    with `root` and `before` (a snapshot), nothing under `root` changed. Returns the message."""

    def check(result: CliResult, *mentions: str, root: Path | None = None, before: dict | None = None) -> str:
        text = " ".join(result.err.split())
        assert result.code == 2, f"{result.command}: exit {result.code}\n{result.out}\n{result.err}"
        message = text[text.rfind("error: ") :]  # after any progress bar the command drew on stderr
        assert message.startswith("error: ") and ": expected " in message and ". Fix: " in message, message
        assert "Traceback" not in result.err
        for text in mentions:
            assert text in message, f"{text!r} not in {message!r}"
        if root is not None and before is not None:
            assert tree(root) == before, "the refused command left or changed files"
        record(request.node.name, _scrub(result.command), result.code, _scrub(message))
        return message

    return check


@pytest.fixture
def api_refused(request: pytest.FixtureRequest) -> Callable[..., SsdoptError]:
    """`api_refused(trigger, call, *mentions)`: assert `call()` raises an SsdoptError that names each of
    `mentions` and carries an expectation and a fix; records it with `trigger` as the how."""

    def check(trigger: str, call: Callable[[], Any], *mentions: str) -> SsdoptError:
        with pytest.raises(SsdoptError) as info:
            call()
        message = str(info.value)
        assert ": expected " in message and ". Fix: " in message and info.value.fix, message
        for text in mentions:
            assert text in message, f"{text!r} not in {message!r}"
        record(request.node.name, _scrub(trigger), "API", _scrub("error: " + message))
        return info.value

    return check


@pytest.fixture
def accepted(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """`accepted(trigger, what_happened)`: record an input that is accepted by a documented rule."""

    def note(trigger: str, observed: str) -> None:
        record(request.node.name, trigger, 0, observed)

    return note


@pytest.fixture(scope="session")
def tiny_engine(tiny_export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX Runtime fp32 engine of the tiny export (head outputs; decoded with anchors.npy)."""
    from ssdopt.build import build_engine

    return build_engine("onnxruntime", "fp32", tiny_export.model, tmp_path_factory.mktemp("engines")).path


@pytest.fixture
def engine_copy(tiny_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny engine directory, free to damage."""
    return Path(shutil.copytree(tiny_engine, tmp_path / "engine"))


def write_image(path: Path, mode: str = "RGB", size: int = 48) -> Path:
    """A small image file in PIL `mode` (RGB, L, RGBA, I;16) with some structure."""
    import numpy as np
    from PIL import Image

    ramp = np.add.outer(np.arange(size), np.arange(size)) * (255 // (2 * size))
    if mode == "I;16":
        image = Image.fromarray((ramp * 257).astype("<u2"))  # 16-bit grey
    elif mode == "L":
        image = Image.fromarray(ramp.astype(np.uint8))
    else:
        rgb = np.stack([ramp, ramp[::-1], ramp.T], axis=-1).astype(np.uint8)
        image = Image.fromarray(rgb).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def image_file() -> Callable[..., Path]:
    """`image_file(path, mode="RGB", size=48)`: write a small test image (see write_image)."""
    return write_image


def _register_fault_support() -> None:
    """tests/reliability/_fault_support.py as the module `ssdopt_tests_fault_support` (tests/ is no
    package), once, before the fault test modules import it."""
    import importlib.util
    import sys

    name = "ssdopt_tests_fault_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_fault_support.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])


_register_fault_support()
