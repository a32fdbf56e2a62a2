"""Promotion policy: accuracy gate, fastest p99 wins, incumbent handling, cross-target refusal."""

from __future__ import annotations

import math

import pytest

from ssdopt.errors import SsdoptError
from ssdopt.tracking.promotion import Candidate, decide


def c(
    version: str, p99: float | None, delta: float | None, ok: bool = True, target: str = "cpu"
) -> Candidate:
    return Candidate(version=version, target=target, p99_ms=p99, delta_map=delta, validated=ok)


def test_fastest_within_budget_wins_and_old_champion_becomes_previous() -> None:
    d = decide([c("1", 5.0, 0.0), c("2", 2.0, -0.4), c("3", 1.0, -3.0)], current="1", budget=1.0)
    assert d.champion == "2" and d.previous == "1" and d.changed
    assert "accuracy gate" in d.reasons["3"]
    assert "slower than champion v2" in d.reasons["1"]


def test_budget_boundary_is_inclusive() -> None:
    first = decide([c("1", 1.0, -1.0)], current=None, budget=1.0)
    assert first.champion == "1" and first.changed
    assert decide([c("1", 1.0, -1.0001)], current=None, budget=1.0).champion is None


def test_incumbent_keeps_alias_when_nothing_passes() -> None:
    d = decide([c("1", 1.0, -5.0), c("2", None, 0.0), c("3", 1.0, 0.0, ok=False)], current="7")
    assert d.champion == "7" and d.previous is None and not d.changed
    assert d.reasons == {"1": d.reasons["1"], "2": "no latency measured", "3": "failed validation"}


def test_tie_keeps_incumbent_then_older_version() -> None:
    assert decide([c("4", 2.0, 0.0), c("9", 2.0, 0.0)], current="9").champion == "9"
    assert decide([c("4", 2.0, 0.0), c("9", 2.0, 0.0)], current=None).champion == "4"


def test_nan_metrics_are_ineligible() -> None:
    d = decide([c("1", math.nan, 0.0), c("2", 3.0, math.nan), c("3", 9.0, 0.5)], current=None)
    assert d.champion == "3"
    assert d.reasons["1"] == "no latency measured" and d.reasons["2"] == "no accuracy measured"


def test_never_across_targets() -> None:
    with pytest.raises(SsdoptError, match="one deployment target"):
        decide([c("1", 1.0, 0.0, target="cpu-avx512"), c("2", 0.5, 0.0, target="h100")], current=None)


def test_negative_budget_rejected() -> None:
    with pytest.raises(SsdoptError, match="non-negative"):
        decide([c("1", 1.0, 0.0)], current=None, budget=-1)


def test_rollback_champion_regains_when_challenger_regresses() -> None:
    # v2 was champion; its re-measured p99 got worse than v1's: v1 returns, v2 becomes previous.
    d = decide([c("1", 1.5, 0.0), c("2", 1.8, 0.0)], current="2")
    assert (d.champion, d.previous) == ("1", "2")
