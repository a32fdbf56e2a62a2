"""Shared servers for tests/infra: started once per module by ssdopt.infra (the code behind
`make infra-up`), skipped with the reason where PostgreSQL cannot be used. A module that needs the
Prefect server too sets `WITH_PREFECT = True`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ssdopt.errors import SsdoptError
from ssdopt.infra import Infra, pg_bin


@pytest.fixture(scope="module")
def infra(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    """PostgreSQL + S3 + MLflow (+ Prefect where the module asks) on loopback; purged afterwards."""
    try:
        pg_bin("initdb")
    except SsdoptError as exc:
        pytest.skip(f"PostgreSQL cannot be used here: {exc}")
    started = time.monotonic()
    servers = Infra(
        str(tmp_path_factory.mktemp("infra")), zombie_after_s=getattr(request.module, "ZOMBIE_AFTER_S", 90)
    ).up(prefect=getattr(request.module, "WITH_PREFECT", False))
    print(f"servers up in {time.monotonic() - started:.1f} s")
    yield servers
    servers.down(purge=True)
