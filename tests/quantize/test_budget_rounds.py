"""The shared accuracy-budget loop (ssdopt.quantize.budget) with fake candidates: no model, no runtime."""

from __future__ import annotations

from typing import Any

import pytest

from ssdopt.errors import SsdoptError
from ssdopt.quantize.budget import budget_rounds

LAYERS = ["a", "b", "c", "d", "e", "f"]  # also the sensitivity ranking, worst first


class Fake:
    """Candidates are the float layers; mAP is 0.50 minus 1 point per layer left int8."""

    def __init__(self, maps: list[float] | None = None) -> None:
        self.maps = maps  # fixed mAP per round instead of the per-layer rule
        self.built: list[tuple[int, list[str]]] = []
        self.ranked: list[tuple[str, ...]] = []

    def build(self, round_index: int, nodes: list[str]) -> tuple[tuple[str, ...], float]:
        self.built.append((round_index, list(nodes)))
        if self.maps is not None:
            return tuple(nodes), self.maps[round_index]
        return tuple(nodes), 0.50 - 0.01 * len(set(LAYERS) - set(nodes))

    def rank(self, candidate: tuple[str, ...]) -> list[dict[str, Any]]:
        self.ranked.append(candidate)
        return [{"node": name, "loss_db": 10.0 - i} for i, name in enumerate(LAYERS)]


def run(fake: Fake, **options: Any):
    settings: dict[str, Any] = {
        "reference": 0.50,
        "budget_points": 2.5,
        "max_rounds": 4,
        "layers_per_round": 2,
    }
    return budget_rounds(fake.build, fake.rank, **(settings | options))


def test_budget_met_in_round_0_ranks_nothing() -> None:
    fake = Fake(maps=[0.49])
    outcome = run(fake, exclude=["x"])
    assert outcome.within_budget and outcome.candidate == ("x",) and outcome.excluded == ["x"]
    assert outcome.map == 0.49 and fake.ranked == []
    assert outcome.rounds == [{"round": 0, "fallback_layers": ["x"], "map": 0.49, "drop_points": 1.0}]


def test_budget_met_after_two_rounds_of_the_worst_layers() -> None:
    fake = Fake()
    outcome = run(fake)  # 6 int8 layers: 6 points, then 4, then 2 <= 2.5
    assert [r["round"] for r in outcome.rounds] == [0, 1, 2]
    assert [r["drop_points"] for r in outcome.rounds] == pytest.approx([6.0, 4.0, 2.0])
    assert [r["fallback_layers"] for r in outcome.rounds] == [[], ["a", "b"], ["a", "b", "c", "d"]]
    assert outcome.within_budget and outcome.excluded == ["a", "b", "c", "d"]
    assert outcome.candidate == ("a", "b", "c", "d") and outcome.map == pytest.approx(0.48)
    assert fake.built == [(0, []), (1, ["a", "b"]), (2, ["a", "b", "c", "d"])]
    assert fake.ranked == [(), ("a", "b")]  # rankings of the rounds that missed the budget
    assert len(outcome.rounds[0]["sensitivity"]) == 6  # max(3 * layers_per_round, 5) rows
    assert "sensitivity" not in outcome.rounds[-1]


def test_budget_never_met_returns_the_most_accurate_round() -> None:
    fake = Fake(maps=[0.40, 0.45, 0.42])
    outcome = run(fake, max_rounds=2, layers_per_round=1)
    assert not outcome.within_budget and len(outcome.rounds) == 3
    assert outcome.map == 0.45 and outcome.candidate == ("a",) and outcome.excluded == ["a"]
    assert len(fake.ranked) == 2  # the last round is not ranked: no round would use it
    assert outcome.rounds[-1]["fallback_layers"] == ["a", "b"]


def test_layers_already_float_are_never_picked_again() -> None:
    fake = Fake()
    outcome = run(fake, exclude=["b", "c"], budget_points=0.5)
    assert [r["fallback_layers"] for r in outcome.rounds] == [
        ["b", "c"],
        ["b", "c", "a", "d"],
        ["b", "c", "a", "d", "e", "f"],
    ]
    assert outcome.within_budget and len(set(outcome.excluded)) == len(outcome.excluded) == 6


def test_loop_stops_when_the_ranking_has_nothing_new() -> None:
    fake = Fake(maps=[0.40, 0.41])
    outcome = run(fake, exclude=LAYERS[:5], layers_per_round=2)
    assert len(outcome.rounds) == 2 and outcome.rounds[1]["fallback_layers"] == LAYERS
    assert not outcome.within_budget and outcome.excluded == LAYERS and len(fake.built) == 2


def test_negative_max_rounds_is_refused() -> None:
    with pytest.raises(SsdoptError, match="max_rounds"):
        run(Fake(), max_rounds=-1)
