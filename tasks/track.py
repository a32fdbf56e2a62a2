"""MLflow logging and registry promotion, retried for transient faults (an unreachable server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from ssdopt import tracking


@task(name="log-engine", retries=3, retry_delay_seconds=[2, 5, 10])
def log_engine(
    row: dict[str, Any], params: dict[str, Any], registered_model: str, experiment: str, mlflow_root: str
) -> dict[str, Any]:
    """Log one engine run (idempotent: an engine already logged is found by its sha256, not re-logged)."""
    store = tracking.local_store(mlflow_root)
    run_id, version = tracking.log_engine_once(
        store,
        experiment,
        Path(row["engine"]),
        params=params,
        metrics={k: row.get(k) for k in tracking.LOGGED_METRICS},
        artifacts={"report": Path(row["engine"]) / "fusion.md"},
        registered_model=registered_model,
        tags={
            "ssdopt.target": row["target"],
            "ssdopt.validated": str(row["status"] == "validated").lower(),
            **({"ssdopt.engine_target": row["engine_target"]} if row.get("engine_target") else {}),
        },
        run_name=f"{row['backend']}-{row['precision']}",
    )
    get_run_logger().info(
        "%s %s: run %s, %s v%s", row["backend"], row["precision"], run_id, registered_model, version
    )
    return {"run_id": run_id, "version": version}


@task(name="promote", retries=3, retry_delay_seconds=[2, 5, 10])
def promote(registered_model: str, budget: float, mlflow_root: str) -> dict[str, Any]:
    """Apply the promotion policy to one deployment target's registered model."""
    store = tracking.local_store(mlflow_root)
    decision = tracking.promote(store, registered_model, budget)
    return {
        "model": registered_model,
        "champion": decision.champion,
        "previous": decision.previous,
        "changed": decision.changed,
        "reasons": decision.reasons,
        "tracking_uri": tracking.redact_uri(store.tracking_uri),  # printed in reports and logs
    }
