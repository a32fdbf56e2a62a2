"""Bad ONNX inputs to `ssdopt build` / `ssdopt quantize`: each is refused with exit code 2, a message
naming the file, the expectation and the fix, and nothing written (no engine folder, no empty roots)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest


def _copy_export(tiny_export, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "anchors.npy", "export.json"):
        shutil.copyfile(tiny_export.directory / name, directory / name)
    return directory / "model.onnx"


def _build(cli, onnx_path: Path, *extra: str):
    return cli("build", "--backend", "onnxruntime", "--onnx", str(onnx_path), "--out", "engines", *extra)


def test_corrupt_onnx(workdir: Path, cli, refused, snapshot) -> None:
    bad = workdir.parent / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)) * 4)
    before = snapshot(workdir)
    refused(
        _build(cli, bad), "corrupt.onnx", "a readable ONNX model", "re-export", root=workdir, before=before
    )


def test_truncated_onnx(workdir: Path, cli, refused, snapshot, tiny_export) -> None:
    source = tiny_export.model.read_bytes()
    bad = workdir.parent / "truncated.onnx"
    bad.write_bytes(source[: len(source) // 2])
    before = snapshot(workdir)
    refused(_build(cli, bad), "truncated.onnx", "readable ONNX model", root=workdir, before=before)


def test_missing_onnx(workdir: Path, cli, refused, snapshot) -> None:
    before = snapshot(workdir)
    refused(
        _build(cli, workdir.parent / "absent.onnx"),
        "absent.onnx",
        "ssdopt export",
        root=workdir,
        before=before,
    )


@pytest.mark.parametrize("opset", [99, 7])
def test_unsupported_opset(workdir: Path, cli, refused, snapshot, tiny_export, opset: int) -> None:
    model = onnx.load(str(tiny_export.model))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    bad = workdir.parent / f"opset{opset}.onnx"
    onnx.save(model, str(bad))
    before = snapshot(workdir)
    message = refused(
        _build(cli, bad), f"opset{opset}.onnx", f"got {opset}", "--opset 18", root=workdir, before=before
    )
    assert f"opset {13}.." in message


def _external_export(tiny_export, directory: Path, location: str = "weights.data") -> Path:
    path = _copy_export(tiny_export, directory)
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_missing_external_data_file(workdir: Path, cli, refused, snapshot, tiny_export) -> None:
    path = _external_export(tiny_export, workdir.parent / "ext")
    (path.parent / "weights.data").unlink()
    before = snapshot(workdir)
    refused(_build(cli, path), "weights.data", "external-data file", "beside it", root=workdir, before=before)


def test_truncated_external_data_file(workdir: Path, cli, refused, snapshot, tiny_export) -> None:
    path = _external_export(tiny_export, workdir.parent / "ext")
    data = path.parent / "weights.data"
    data.write_bytes(data.read_bytes()[:100])
    before = snapshot(workdir)
    refused(_build(cli, path), "weights.data", "bytes for", "got 100", root=workdir, before=before)


def test_external_data_outside_the_model_folder(workdir: Path, cli, refused, snapshot, tiny_export) -> None:
    path = _external_export(tiny_export, workdir.parent / "ext")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save(model, str(path))
    before = snapshot(workdir)
    refused(
        _build(cli, path),
        "model.onnx",
        "external data inside",
        "../../etc/passwd",
        root=workdir,
        before=before,
    )


def test_onnx_over_the_size_limit(workdir: Path, cli, refused, snapshot, tiny_export, monkeypatch) -> None:
    path = _copy_export(tiny_export, workdir.parent / "export")
    monkeypatch.setenv("SSDOPT_MAX_ONNX_MB", "0.01")
    before = snapshot(workdir)
    refused(
        _build(cli, path), "model.onnx", "at most 0.01 MB", "SSDOPT_MAX_ONNX_MB", root=workdir, before=before
    )


def test_onnx_over_the_node_limit(workdir: Path, cli, refused, snapshot, tiny_export, monkeypatch) -> None:
    path = _copy_export(tiny_export, workdir.parent / "export")
    monkeypatch.setenv("SSDOPT_MAX_ONNX_NODES", "5")
    before = snapshot(workdir)
    refused(
        _build(cli, path),
        "model.onnx",
        "at most 5 nodes",
        "SSDOPT_MAX_ONNX_NODES",
        root=workdir,
        before=before,
    )


def test_invalid_limit_setting(workdir: Path, cli, refused, snapshot, tiny_export, monkeypatch) -> None:
    path = _copy_export(tiny_export, workdir.parent / "export")
    monkeypatch.setenv("SSDOPT_MAX_ONNX_NODES", "lots")
    before = snapshot(workdir)
    refused(
        _build(cli, path), "SSDOPT_MAX_ONNX_NODES", "a positive number", "unset", root=workdir, before=before
    )


def test_quantize_refuses_a_corrupt_onnx_before_writing(workdir: Path, cli, refused, snapshot) -> None:
    bad = workdir.parent / "corrupt.onnx"
    bad.write_bytes(b"not a protobuf at all" * 50)
    before = snapshot(workdir)
    result = cli("quantize", "--precision", "fp16", "--onnx", str(bad), "--out", "quantized/fp16")
    refused(result, "corrupt.onnx", "readable ONNX", root=workdir, before=before)


def test_real_process_exit_code_for_a_corrupt_onnx(workdir: Path, cli_process, refused, snapshot) -> None:
    """The console script itself (not the in-process entry point) exits 2 with one error line."""
    bad = workdir.parent / "corrupt.onnx"
    bad.write_bytes(b"garbage" * 100)
    before = snapshot(workdir)
    result = cli_process("build", "--onnx", str(bad), "--out", "engines")
    refused(result, "corrupt.onnx", root=workdir, before=before)
