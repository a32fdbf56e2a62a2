"""Scheduled optimize runs: `ssdopt serve --cron "0 3 * * *"`.

Schedules need a Prefect server that outlives this process: start one with
`prefect server start` (and `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`), then
run this; it serves the deployment until stopped. Per-hardware work pools: see README.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from ssdopt.errors import SsdoptError

START_SERVER = (
    "start one with `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
    "(or `prefect config set PREFECT_API_URL=...`) and rerun"
)


def prefect_api_url() -> str:
    """The Prefect server schedules are kept in. Without one Prefect would serve on a temporary server
    that forgets the schedule when this process exits: refused, not silently accepted."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise SsdoptError(
            "PREFECT_API_URL",
            "the URL of a running Prefect server (a schedule lives in its database; without one Prefect "
            "starts a temporary server that forgets it when `ssdopt serve` exits)",
            START_SERVER,
        )
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SsdoptError(url, f"a reachable Prefect server ({reason})", START_SERVER) from None
    return url


def serve(cron: str, name: str = "optimize-scheduled", params_file: str = "params.yaml") -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise SsdoptError(
            f"--cron {cron!r}", "a valid cron expression, e.g. '0 3 * * *'", "fix --cron"
        ) from exc
    prefect_api_url()
    from flows.optimize import optimize

    optimize.serve(name=name, cron=cron, parameters={"params_file": params_file})


if __name__ == "__main__":
    import sys

    serve(sys.argv[1] if len(sys.argv) > 1 else "0 3 * * *")
