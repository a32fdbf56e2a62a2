"""No silent wrong numbers: an engine is scored only on its own classes, agreement is undefined (n/a)
when the reference found nothing, and one accuracy gate serves the bench, evaluate-engines and the flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssdopt.backends.base import Engine
from ssdopt.data.coco import load_coco
from ssdopt.errors import SsdoptError
from ssdopt.evaluate.bench_output import cell
from ssdopt.evaluate.engine import agreement, engine_classes, evaluate_engine, validation_problems
from ssdopt.evaluate.report_table import format_rows


def _det(image: int, category: int, box: tuple[float, float, float, float], score: float) -> dict:
    return {"image_id": image, "category_id": category, "bbox": list(box), "score": score}


def test_agreement_is_undefined_without_a_confident_reference() -> None:
    candidate = [_det(1, 3, (0, 0, 10, 10), 0.9)]
    assert agreement(candidate, []) is None
    assert agreement(candidate, [_det(1, 3, (0, 0, 10, 10), 0.29)]) is None  # below min_score 0.3
    assert agreement([], [_det(1, 3, (0, 0, 10, 10), 0.9)]) == 0.0  # a reference box nobody reproduced
    assert agreement(candidate, [_det(1, 3, (0, 0, 10, 10), 0.9)]) == 1.0
    assert agreement([_det(1, 4, (0, 0, 10, 10), 0.9)], [_det(1, 3, (0, 0, 10, 10), 0.9)]) == 0.0  # class


def test_undefined_agreement_reads_n_a_not_a_number() -> None:
    validated = {"status": "validated", "delta_map": 0.0, "agreement": None}
    assert cell(validated, "agreement") == "n/a"
    assert format_rows([validated])[0]["agree"] == "n/a"
    not_measured = {"status": "failed", "delta_map": None, "agreement": None}
    assert cell(not_measured, "agreement") == "–"


@pytest.mark.parametrize(
    ("delta_map", "share", "failing"),
    [
        (0.0, 1.0, []),
        (-1.0, 0.9, []),  # exactly at the budget and the threshold: passes
        (-1.01, 0.95, ["mAP"]),
        (0.0, 0.89, ["agreement"]),
        (-2.0, 0.1, ["mAP", "agreement"]),
        (0.0, None, []),  # nothing to agree with: ΔmAP alone decides
        (-2.0, None, ["mAP"]),
        (None, 0.5, ["agreement"]),
    ],
)
def test_one_gate(delta_map, share, failing) -> None:  # noqa: ANN001
    problems = validation_problems(delta_map, share, budget_points=1.0, min_agreement=0.9)
    assert [p.split()[0] for p in problems] == failing


def _relabelled(dataset: Path, root: Path, edit) -> Path:  # noqa: ANN001
    data = json.loads(dataset.read_text())
    data["categories"] = edit(data["categories"])
    keep = {c["id"] for c in data["categories"]}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "val.json"
    path.write_text(json.dumps(data))
    return path


def test_evaluate_refuses_an_engine_of_other_classes(bench_run, tmp_path: Path) -> None:
    engine = Engine.open(bench_run["engine"])
    names, count = engine_classes(engine)
    images = bench_run["dataset"].parent / "val"
    own = load_coco(bench_run["dataset"])
    assert names == own.class_names() and count == len(names)
    evaluate_engine(engine, own, limit=2)  # its own classes: scored

    renamed = _relabelled(
        bench_run["dataset"], tmp_path / "renamed", lambda cats: [{**c, "name": f"x{c['id']}"} for c in cats]
    )
    with pytest.raises(SsdoptError) as info:
        evaluate_engine(engine, load_coco(renamed, images), limit=2)
    message = str(info.value)
    assert str(engine.path) in message and names[1] in message and "x" in message and "Fix:" in message

    fewer = _relabelled(bench_run["dataset"], tmp_path / "fewer", lambda cats: cats[:4])
    with pytest.raises(SsdoptError, match="4 classes"):
        evaluate_engine(engine, load_coco(fewer, images), limit=2)


def test_the_background_name_is_not_compared(bench_run, tmp_path: Path) -> None:
    """Exports name label 0 as they like; only the object classes must match."""
    import shutil

    engine_dir = Path(shutil.copytree(bench_run["engine"], tmp_path / "engine"))
    record = json.loads((engine_dir / "export.json").read_text())
    record["class_names"] = ["background", *record["class_names"][1:]]
    (engine_dir / "export.json").write_text(json.dumps(record))
    evaluate_engine(Engine.open(engine_dir), load_coco(bench_run["dataset"]), limit=2)


def test_throughput_over_batch_sizes_with_one_runner(bench_run) -> None:
    """Every batch is timed with the same loaded runner: images/s = batch / median latency."""
    from ssdopt.evaluate.engine import engine_throughput
    from ssdopt.evaluate.latency import TimingPlan

    plan = TimingPlan(warmup_s=0.0, min_duration_s=0.0, min_iterations=3)
    swept = engine_throughput(Engine.open(bench_run["engine"]), (1, 2, 5), plan)
    assert sorted(swept) == [1, 2, 5]
    for batch in (1, 2, 5):
        stats = swept[batch]
        assert not isinstance(stats, str), stats
        assert stats.batch == batch and stats.throughput_ips == pytest.approx(batch * 1000 / stats.median_ms)
