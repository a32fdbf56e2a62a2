"""`ssdopt serve` refuses, with exit code 2 and the fix, what would silently lose a schedule or crash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SSDOPT = Path(sys.executable).with_name("ssdopt")


def _serve(tmp_path: Path, *args: str, api: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run(
        [str(SSDOPT), "serve", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the with-block ends


@pytest.mark.parametrize(
    ("case", "mentions"),
    [
        ("no server configured", ("PREFECT_API_URL", "temporary server", "prefect server start")),
        ("server unreachable", ("expected a reachable Prefect server", "Connection refused")),
        ("bad cron", ("--cron", "cron expression")),
    ],
)
def test_serve_refuses_cleanly(case: str, mentions: tuple[str, ...], tmp_path: Path) -> None:
    if case == "no server configured":
        done = _serve(tmp_path)
    elif case == "server unreachable":
        done = _serve(tmp_path, api=f"http://127.0.0.1:{_closed_port()}/api")
    else:
        done = _serve(tmp_path, "--cron", "61 * * * *", api="http://127.0.0.1:1/api")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Fix:" in done.stderr, done.stderr
    for text in mentions:
        assert text in done.stderr, done.stderr
