"""Data steps through DVC, so the Prefect flow and `dvc repro` produce the same, versioned outputs."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task

from ssdopt.dvcinfo import output_md5
from ssdopt.errors import SsdoptError


@contextmanager
def repo_lock(root: Path):
    """Serialise DVC operations of concurrent flows (DVC itself refuses a second repro outright)."""
    path = root / ".dvc" / "tmp" / "ssdopt-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(name="dvc-repro", retries=1, retry_delay_seconds=5)
def dvc_repro(stages: list[str], root: str = ".") -> dict[str, str | None]:
    """`dvc repro <stages...>` (and what they depend on); returns the DVC md5 of each pipeline output."""
    root_path = Path(root).resolve()
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.exists() else "dvc", "repro", *stages]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with repo_lock(root_path):
        proc = subprocess.run(command, cwd=root_path, env=env, capture_output=True, text=True)
    logger = get_run_logger()
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode != 0:
        raise SsdoptError(
            f"dvc repro {' '.join(stages)}", f"exit code 0, got {proc.returncode}:\n{tail}", "fix the stage"
        )
    logger.info("dvc repro %s:\n%s", " ".join(stages), tail)
    lock = root_path / "dvc.lock"
    return {
        "synthetic": output_md5("data/synthetic", lock),
        "calibration": output_md5("data/calibration", lock),
        "onnx": output_md5("artifacts/onnx", lock),
    }
