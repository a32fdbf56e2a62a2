"""Fault-injection helpers: run a step in a subprocess and SIGKILL it at a point seen on disk, check
that an engine directory is complete, run a real `mlflow server` on loopback, mount a tiny tmpfs.

Loaded by path from the test modules (tests/ has no packages): `support = load_support()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from ssdopt.cli import main; main()"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no tracking URI or credentials leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def kill_when(
    command: list[str],
    ready: Callable[[], bool],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> str:
    """Start `command`, poll `ready()` every 5 ms and SIGKILL the child as soon as it is true.

    Returns the child's output. Fails the test if the child exits before `ready()` held (the kill
    point was never reached) or the point is not reached within `timeout` seconds.
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if proc.poll() is not None:
                    out.seek(0)
                    pytest.fail(f"{command} exited ({proc.returncode}) before the kill point:\n{out.read()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"kill point of {command} not reached in {timeout} s")
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{command} ended with {proc.returncode}, not by SIGKILL"
        out.seek(0)
        return out.read()


def run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `command` to its end, output captured as text."""
    return subprocess.run(
        command, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_complete_engine(path: Path) -> dict:
    """The engine directory is whole: JSON files parse and the engine bytes match metadata's sha256."""
    meta = json.loads((path / "metadata.json").read_text())
    json.loads((path / "layers.json").read_text())
    json.loads((path / "fusion.json").read_text())
    files = [path / name for name in meta["engine"].get("files", [meta["engine"]["file"]])]
    if len(files) == 1:
        digest = sha256_file(files[0])
    else:
        from ssdopt.fileio import sha256_files

        digest = sha256_files(files)
    assert digest == meta["engine"]["sha256"], f"{path}: engine bytes differ from metadata.json"
    return meta


def visible_entries(directory: Path) -> list[Path]:
    """What a reader of `directory` would take for an output: not hidden, not a temp/old dir."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".") and ".tmp-" not in p.name and ".old-" not in p.name
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback in its own process group (uvicorn forks): start, wait, kill."""

    def __init__(self, root: Path, *, app_name: str | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "server.db"
        self.artifacts = root / "artifacts"
        self.app_name = app_name
        self.env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow) if mlflow.exists() else "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--default-artifact-root",
            self.artifacts.as_uri(),
        ]
        if self.app_name:
            command += ["--app-name", self.app_name]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait(self, timeout: float = 180.0) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.2)
        pytest.fail(f"mlflow server not up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group (the server and its workers, nothing else) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`; skips the test where mounting is not permitted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("disk-full cases mount a small tmpfs, which needs root (CI may not be root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): disk-full cases need it")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def sqlite_rows(db: Path, query: str, *, strict: bool = False) -> list[tuple]:
    """Rows of `query` on a SQLite file.

    While a writer may be alive (polling for a kill point), the file is opened read-only and any
    SQLite error (file or tables not there yet, a write in progress) reads as [] for "not yet".
    With `strict` (after the writer is dead) it is opened read-write, so SQLite can roll back the
    hot journal a killed writer leaves (a read-only connection cannot, and would see an error, not
    the committed rows), and errors propagate instead of reading as "no rows".
    """
    import sqlite3

    if not db.is_file():
        if strict:
            raise FileNotFoundError(db)
        return []
    uri = f"file:{db}" if strict else f"file:{db}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10 if strict else 1)) as conn:
            return conn.execute(query).fetchall()
    except sqlite3.Error:
        if strict:
            raise
        return []
