"""The accuracy-budget loop of both int8 routes (`quantize_with_budget`: ORT-made Q/DQ,
`quantize_openvino`: NNCF): quantize, evaluate, and while mAP drops more than the budget keep the
most damaging layers in float, up to a number of rounds.

Only the loop lives here, so that the two routes cannot drift apart in their stopping rule or in the
rounds they record; each route says how it builds and evaluates a candidate and how it ranks its layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ssdopt.errors import SsdoptError

C = TypeVar("C")


def checked_map(value: float, what: str) -> float:
    """`value` as a float, refused unless a fraction: a percentage would make every drop look huge."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise SsdoptError(
            f"evaluate({what}) = {value}",
            "mAP as a fraction in [0, 1] (as pycocotools reports it)",
            "return stats[0] of COCOeval, not a percentage",
        )
    return value


@dataclass(frozen=True)
class BudgetOutcome(Generic[C]):
    """The candidate the loop settled on (the first within budget, else the most accurate), with the
    float layers it was built with and every round's record."""

    candidate: C
    map: float
    excluded: list[str]
    within_budget: bool
    rounds: list[dict[str, Any]]


def budget_rounds(
    build: Callable[[int, list[str]], tuple[C, float]],
    rank: Callable[[C], list[dict[str, Any]]],
    *,
    reference: float,
    exclude: Sequence[str] = (),
    budget_points: float,
    max_rounds: int,
    layers_per_round: int,
) -> BudgetOutcome[C]:
    """Rounds 0..`max_rounds`: `build(round, float_layers) -> (candidate, mAP)`, stop once the drop
    from `reference` (mAP points, 0-100 scale) is at most `budget_points`; otherwise put the
    `layers_per_round` worst layers of `rank(candidate)` (rows with "node", worst first) not yet
    float into float, and stop early when none is left.

    `exclude`: layers float from round 0. Each round's dict: round, fallback_layers, map, drop_points,
    and, where a ranking was made, its first max(3 * layers_per_round, 5) rows as sensitivity.
    """
    if max_rounds < 0:
        raise SsdoptError(
            f"max_rounds {max_rounds}", ">= 0 (round 0 is the plain int8 model)", "use 0 or more"
        )
    excluded = list(exclude)
    rounds: list[dict[str, Any]] = []
    best: tuple[float, C, list[str]] | None = None
    chosen: tuple[float, C, list[str]] | None = None
    for round_index in range(max_rounds + 1):
        candidate, value = build(round_index, list(excluded))
        drop = 100.0 * (reference - value)
        rounds.append(
            {
                "round": round_index,
                "fallback_layers": list(excluded),
                "map": value,
                "drop_points": round(drop, 4),
            }
        )
        if best is None or value > best[0]:
            best = (value, candidate, list(excluded))
        if drop <= budget_points:
            chosen = (value, candidate, list(excluded))
            break
        if round_index == max_rounds:
            break
        ranking = rank(candidate)
        rounds[-1]["sensitivity"] = ranking[: max(layers_per_round * 3, 5)]
        new = [row["node"] for row in ranking if row["node"] not in excluded][:layers_per_round]
        if not new:
            break
        excluded += new
    value, candidate, kept = chosen or best  # type: ignore[misc]  # best is set: round 0 always runs
    return BudgetOutcome(candidate, value, kept, chosen is not None, rounds)
