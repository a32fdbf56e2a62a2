"""The promote flow: re-apply the promotion policy to the registered models of given targets."""

from __future__ import annotations

from prefect import flow

from ssdopt import tracking
from ssdopt.config import load_params
from tasks.track import promote


@flow(name="promote", log_prints=True)
def promote_flow(
    params_file: str = "params.yaml", targets: list[str] | None = None, budget: float | None = None
) -> list[dict]:
    """Promote within each target's registered model (never across targets). Targets: `targets`
    (or params.yaml `optimize.target`), else every target with registered engines in the store, else
    this machine's CPU target and, where a GPU is visible, its GPU target."""
    opt = load_params(params_file).get("optimize", {})
    name = opt.get("model_name", "ssdlite-shapes")
    budget = float(budget if budget is not None else opt.get("map_budget", 1.0))
    explicit = targets or ([opt["target"]] if opt.get("target") else None)
    store = tracking.local_store(opt.get("mlflow_root", "mlflow"))
    decisions = []
    for target in tracking.promotion_targets(store, name, explicit):
        decision = promote(f"{name}.{target}", budget, opt.get("mlflow_root", "mlflow"))
        print(f"{decision['model']}: champion v{decision['champion']} (previous v{decision['previous']})")
        decisions.append(decision)
    return decisions


if __name__ == "__main__":
    promote_flow()
