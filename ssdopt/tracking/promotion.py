"""The promotion policy, as a pure function: which registered engine version is champion.

Rule: among candidates of ONE deployment target that built and validated, those whose mAP is
within the accuracy budget of the fp32 reference are eligible; the fastest by p99 latency is
champion. A new champion demotes the former one to `previous`. Every loser gets a reason.
The MLflow side (tracking/__init__.py) only reads candidates and applies the decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from ssdopt.errors import SsdoptError


@dataclass(frozen=True)
class Candidate:
    """A registered engine version with the metrics its run logged."""

    version: str
    target: str
    p99_ms: float | None
    delta_map: float | None  # mAP points vs the fp32 reference (negative = worse)
    validated: bool = True


@dataclass(frozen=True)
class Decision:
    target: str
    champion: str | None
    previous: str | None
    incumbent: str | None = None  # champion before this decision
    reasons: dict[str, str] = field(default_factory=dict)  # version -> why not champion

    @property
    def changed(self) -> bool:
        return self.champion != self.incumbent


def _ineligible(candidate: Candidate, budget: float) -> str | None:
    if not candidate.validated:
        return "failed validation"
    if candidate.p99_ms is None or not math.isfinite(candidate.p99_ms):
        return "no latency measured"
    if candidate.delta_map is None or not math.isfinite(candidate.delta_map):
        return "no accuracy measured"
    if candidate.delta_map < -budget:
        return f"accuracy gate: mAP {candidate.delta_map:+.2f} points vs fp32, budget -{budget:.2f}"
    return None


def decide(candidates: Iterable[Candidate], current: str | None, budget: float = 1.0) -> Decision:
    """Pick the champion of one target.

    Args:
        candidates: every version of the registered model, the current champion included.
        current: version that holds the `champion` alias now, or None.
        budget: largest allowed mAP drop in points (param `promote.map_budget`).
    """
    pool = list(candidates)
    if budget < 0:
        raise SsdoptError(
            f"map budget {budget}", "a non-negative number of mAP points", "fix promote.map_budget"
        )
    targets = {c.target for c in pool}
    if len(targets) > 1:
        raise SsdoptError(
            f"candidates of targets {sorted(targets)}",
            "candidates of one deployment target (engines never compete across hardware)",
            "promote each registered model separately",
        )
    target = next(iter(targets), "")
    reasons: dict[str, str] = {}
    eligible: list[Candidate] = []
    for candidate in pool:
        why = _ineligible(candidate, budget)
        if why is None:
            eligible.append(candidate)
        else:
            reasons[candidate.version] = why
    if not eligible:
        # Nothing passes: keep whoever holds the alias (a failed rerun must not dethrone it).
        return Decision(target, champion=current, previous=None, incumbent=current, reasons=reasons)
    # Fastest p99 wins; on a tie the incumbent, then the older version, keeps it.
    best = min(eligible, key=lambda c: (c.p99_ms, c.version != current, int(c.version)))
    for candidate in eligible:
        if candidate.version != best.version:
            reasons[candidate.version] = (
                f"slower than champion v{best.version}: p99 {candidate.p99_ms:.3f} ms vs {best.p99_ms:.3f} ms"
            )
    previous = current if current is not None and current != best.version else None
    return Decision(target, champion=best.version, previous=previous, incumbent=current, reasons=reasons)
