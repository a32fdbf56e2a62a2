"""Damaged or foreign engine directories: `ssdopt detect` / `ssdopt evaluate` refuse them before the
runtime sees a byte (exit code 2, message naming the file, the expectation and the fix), and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _detect(cli, engine: Path, image: Path):
    return cli("detect", "--engine", str(engine), "--out", "detections", str(image))


def _edit_metadata(engine: Path, change) -> None:  # noqa: ANN001
    path = engine / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _truncate(engine: Path) -> None:
    (engine / "engine.onnx").write_bytes((engine / "engine.onnx").read_bytes()[:1000])


def _flip_one_byte(engine: Path) -> None:
    data = bytearray((engine / "engine.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    (engine / "engine.onnx").write_bytes(bytes(data))


def _metadata_not_json(engine: Path) -> None:
    (engine / "metadata.json").write_text("{ not json")


def _no_metadata(engine: Path) -> None:
    (engine / "metadata.json").unlink()


def _no_anchors(engine: Path) -> None:
    (engine / "anchors.npy").unlink()


DAMAGE = {
    "truncated_engine_file": (_truncate, ("engine.onnx", "as recorded at build", "ssdopt build")),
    "engine_sha256_mismatch": (_flip_one_byte, ("engine.onnx", "sha256", "changed after it was built")),
    "another_device": (
        lambda e: _edit_metadata(e, lambda m: m["device"].update(name="Some Other CPU 9000", flags=["avx2"])),
        ("Some Other CPU 9000", "this machine", "hardware specific"),
    ),
    "another_runtime_version": (
        lambda e: _edit_metadata(e, lambda m: m["runtime"].update(version="0.0.1")),
        ("onnxruntime 0.0.1", "install onnxruntime==0.0.1"),
    ),
    "unknown_schema": (
        lambda e: _edit_metadata(e, lambda m: m.update(schema="someone-elses-engine")),
        ("metadata.json", "ssdopt-engine-1", "someone-elses-engine"),
    ),
    "metadata_not_json": (_metadata_not_json, ("metadata.json", "valid JSON", "ssdopt build")),
    "not_an_engine_directory": (_no_metadata, ("metadata.json", "engine directory")),
    "anchors_missing": (_no_anchors, ("anchors.npy", "ssdopt build")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_foreign_engine(workdir, cli, refused, snapshot, engine_copy, image_file, damage) -> None:
    change, mentions = DAMAGE[damage]
    image = image_file(workdir.parent / "in" / "a.png")
    change(engine_copy)
    before = snapshot(workdir)
    refused(_detect(cli, engine_copy, image), *mentions, root=workdir, before=before)


def test_real_process_exit_code_for_a_tampered_engine(
    workdir, cli_process, refused, snapshot, engine_copy, image_file
) -> None:
    image = image_file(workdir.parent / "in" / "a.png")
    (engine_copy / "engine.onnx").write_bytes(b"\0" * 64)
    before = snapshot(workdir)
    result = cli_process("detect", "--engine", str(engine_copy), "--out", "detections", str(image))
    refused(result, "engine.onnx", "sha256", root=workdir, before=before)


@pytest.mark.parametrize(
    "shape", [(1, 3, 32, 32), (1, 1, 64, 64), (2, 4, 64, 64)], ids=["32px", "1ch", "4ch"]
)
def test_inputs_of_the_wrong_size(api_refused, tiny_engine, shape) -> None:
    import numpy as np

    from ssdopt.backends.base import get_backend

    runner = get_backend("onnxruntime").load(tiny_engine)
    images = np.zeros(shape, np.float32)
    api_refused(
        f"runner.infer(zeros{list(shape)}) on a [B, 3, 64, 64] engine",
        lambda: runner.infer(images),
        str(tuple(shape)),
    )
