"""Shared data fixtures: one tiny generated dataset per test session, the hand-made COCO fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssdopt.data.synthetic import generate_dataset

COCO_SMALL = Path(__file__).resolve().parents[1] / "fixtures" / "coco_small"
TINY_SPLITS = {"train": 24, "val": 8}
TINY_SEED = 1234


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-image synthetic dataset (train 24, val 8), generated in this process. Treat as read-only."""
    out = tmp_path_factory.mktemp("tiny") / "synthetic"
    return generate_dataset(out, seed=TINY_SEED, splits=TINY_SPLITS, workers=1, progress=False)


@pytest.fixture(scope="session")
def coco_small() -> Path:
    """The hand-made COCO json (tests/fixtures/coco_small/instances.json); images in instances/."""
    return COCO_SMALL / "instances.json"
