"""Scheduled optimize runs: `ssdopt serve --cron "0 3 * * *"`.

Schedules need a Prefect server that outlives this process: start one with
`prefect server start` (and `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`), then
run this; it serves the deployment until stopped. Per-hardware work pools: see README.
"""

from __future__ import annotations

from flows.optimize import optimize


def serve(cron: str, name: str = "optimize-scheduled", params_file: str = "params.yaml") -> None:
    optimize.serve(name=name, cron=cron, parameters={"params_file": params_file})


if __name__ == "__main__":
    import sys

    serve(sys.argv[1] if len(sys.argv) > 1 else "0 3 * * *")
