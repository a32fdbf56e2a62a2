"""Integrity: checkpoints never unpickled; engine and plugin-library bytes checked against their
recorded sha256 before any runtime or loader sees them; a failed writer leaves no empty folders."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

SSDOPT = Path(__file__).resolve().parents[2] / "ssdopt"


class _Payload:
    """Unpickling this creates `marker`: proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_pickle_checkpoint_is_refused_without_being_unpickled(
    workdir, cli, refused, snapshot, suffix
) -> None:
    marker = workdir.parent / "unpickled"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    checkpoint = workdir.parent / f"evil{suffix}"
    checkpoint.write_bytes(payload)
    before = snapshot(workdir)
    refused(
        cli("export", "--checkpoint", str(checkpoint), "--out", "onnx"),
        f"evil{suffix}",
        "safetensors",
        root=workdir,
        before=before,
    )
    assert not marker.exists()


def _unpickling_calls(tree: ast.AST) -> list[int]:
    """Lines of calls that unpickle: pickle.load(s), joblib.load, and torch.load without
    weights_only=True (the one torch loader allowed: it refuses anything but tensors and containers)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        name = node.func.attr
        safe = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if (owner == "pickle" and name in ("load", "loads")) or (owner == "joblib" and name == "load"):
            lines.append(node.lineno)
        elif owner == "torch" and name == "load" and not safe:
            lines.append(node.lineno)
    return lines


def test_no_pickle_loader_in_the_package() -> None:
    offenders = [
        f"{path.relative_to(SSDOPT.parent)}:{line}"
        for path in SSDOPT.rglob("*.py")
        for line in _unpickling_calls(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_unpickling_check_finds_what_it_must() -> None:
    code = "\n".join(
        [
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "pickle.loads(b)",
            "torch.load(p, weights_only=True)",
        ]
    )
    assert _unpickling_calls(ast.parse(code)) == [1, 2, 3]


def test_engine_sha256_is_checked_before_the_runtime_loads_it(api_refused, engine_copy, monkeypatch) -> None:
    import onnxruntime

    from ssdopt.backends.base import get_backend

    opened: list[str] = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(
        onnxruntime, "InferenceSession", lambda path, *a, **k: opened.append(path) or real(path, *a, **k)
    )
    data = bytearray((engine_copy / "engine.onnx").read_bytes())
    data[-10] ^= 0x01
    (engine_copy / "engine.onnx").write_bytes(bytes(data))
    api_refused(
        "OnnxRuntimeBackend.load(<engine with one flipped bit>)",
        lambda: get_backend("onnxruntime").load(engine_copy),
        "engine.onnx",
        "sha256",
    )
    assert opened == []


def test_an_intact_engine_still_loads(tiny_engine) -> None:
    """The check above can pass: the untouched engine loads and runs."""
    import numpy as np

    from ssdopt.backends.base import get_backend

    runner = get_backend("onnxruntime").load(tiny_engine)
    out = runner.infer(np.zeros((1, 3, 64, 64), np.float32))
    assert out.box_deltas.shape[0] == 1


# ---- the native SSDDecodeNMS library ---------------------------------------------------------------


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch):
    """ssdopt.ops.library with no cached handle, and a recorder in front of ctypes.CDLL."""
    import ctypes

    from ssdopt.ops import library

    monkeypatch.setattr(library, "_cpu_library", None)
    loaded: list[str] = []
    real = ctypes.CDLL

    def recording(path, *args, **kwargs):  # noqa: ANN001, ANN202
        loaded.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", recording)
    return library, loaded


def _build_folder(root: Path, content: bytes, recorded_sha: str | None) -> Path:
    (root / "lib").mkdir(parents=True)
    library = root / "lib" / "libssdopt_nms_cpu.so"
    library.write_bytes(content)
    if recorded_sha is not None:
        record = {"libraries": {library.name: {"sha256": recorded_sha, "bytes": len(content)}}}
        (root / "build.json").write_text(json.dumps(record))
    return library


def test_plugin_library_missing(api_refused, fresh_library, tmp_path, monkeypatch) -> None:
    library, loaded = fresh_library
    monkeypatch.setenv("SSDOPT_NMS_CPU_LIBRARY", str(tmp_path / "libssdopt_nms_cpu.so"))
    api_refused(
        "SSDOPT_NMS_CPU_LIBRARY=<missing file>; ssdopt.ops.library.load_cpu_library()",
        library.load_cpu_library,
        "libssdopt_nms_cpu.so",
        "ssdopt plugin build",
    )
    assert loaded == []


def test_plugin_library_sha256_is_checked_before_loading(
    api_refused, fresh_library, tmp_path, monkeypatch
) -> None:
    library, loaded = fresh_library
    path = _build_folder(tmp_path / "build", b"\x7fELF tampered", recorded_sha="0" * 64)
    monkeypatch.setenv("SSDOPT_NMS_CPU_LIBRARY", str(path))
    api_refused(
        "SSDOPT_NMS_CPU_LIBRARY=<library whose bytes differ from build.json>; load_cpu_library()",
        library.load_cpu_library,
        "libssdopt_nms_cpu.so",
        "as recorded in build.json",
    )
    assert loaded == []


def test_plugin_build_record_not_json(api_refused, fresh_library, tmp_path, monkeypatch) -> None:
    library, loaded = fresh_library
    path = _build_folder(tmp_path / "build", b"whatever", recorded_sha=None)
    (tmp_path / "build" / "build.json").write_text("{ truncated")
    monkeypatch.setenv("SSDOPT_NMS_CPU_LIBRARY", str(path))
    api_refused(
        "SSDOPT_NMS_CPU_LIBRARY=<library beside a corrupt build.json>; load_cpu_library()",
        library.load_cpu_library,
        "build.json",
        "ssdopt plugin build",
    )
    assert loaded == []


def test_plugin_library_that_is_not_a_shared_object(
    api_refused, fresh_library, tmp_path, monkeypatch
) -> None:
    library, _ = fresh_library
    content = b"definitely not ELF"
    path = _build_folder(tmp_path / "build", content, recorded_sha=None)
    monkeypatch.setenv("SSDOPT_NMS_CPU_LIBRARY", str(path))
    api_refused(
        "SSDOPT_NMS_CPU_LIBRARY=<file that is not a shared library>; load_cpu_library()",
        library.load_cpu_library,
        "libssdopt_nms_cpu.so",
        "C ABI version 1",
        "SSDOPT_NMS_CPU_LIBRARY",
    )


def _compile(tmp_path: Path, source: str) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to make a foreign shared library")
    (tmp_path / "src.c").write_text(source)
    out = tmp_path / "build" / "lib" / "libssdopt_nms_cpu.so"
    out.parent.mkdir(parents=True)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(out), str(tmp_path / "src.c")], check=True, timeout=60
    )
    return out


@pytest.mark.parametrize(
    ("source", "mention"),
    [
        ("int ssdopt_nms_abi_version(void) { return 99; }\n", "found 99"),
        ("int some_other_library(void) { return 1; }\n", "undefined symbol"),
    ],
    ids=["abi_99", "no_abi_symbol"],
)
def test_plugin_library_of_the_wrong_abi(
    api_refused, fresh_library, tmp_path, monkeypatch, source, mention
) -> None:
    library, _ = fresh_library
    path = _compile(tmp_path, source)
    (tmp_path / "build" / "build.json").write_text(
        json.dumps({"libraries": {path.name: {"sha256": sha256_file(path)}}})
    )
    monkeypatch.setenv("SSDOPT_NMS_CPU_LIBRARY", str(path))
    api_refused(
        "SSDOPT_NMS_CPU_LIBRARY=<a shared library of another C ABI>; load_cpu_library()",
        library.load_cpu_library,
        "libssdopt_nms_cpu.so",
        "C ABI version 1",
        mention,
    )


def test_engine_built_with_another_plugin_library(api_refused, tmp_path) -> None:
    from ssdopt.backends.engine_dir import check_plugin

    meta = {"plugin": {"path": "/build/a/lib/libssdopt_nms_cpu.so", "sha256": "a" * 64}}
    current = {"path": "/build/b/lib/libssdopt_nms_cpu.so", "sha256": "b" * 64}
    api_refused(
        "check_plugin(<engine recorded with plugin sha a...>, <current plugin sha b...>)",
        lambda: check_plugin(tmp_path / "engine", meta, current),
        "SSDDecodeNMS library",
        "rebuild the engine",
    )


def test_tensorrt_plugin_sha256_is_checked_before_loading(api_refused, tmp_path) -> None:
    from types import SimpleNamespace

    from ssdopt.backends.tensorrt import _load_plugin

    loaded: list[str] = []
    registry = SimpleNamespace(load_library=loaded.append)
    trt = SimpleNamespace(init_libnvinfer_plugins=lambda *a: None, get_plugin_registry=lambda: registry)
    plugin = tmp_path / "libssdopt_nms_tensorrt.so"
    plugin.write_bytes(b"changed since the engine was built")
    api_refused(
        "TensorRtBackend.load(<engine whose plugin library changed>)",
        lambda: _load_plugin(trt, None, plugin, "c" * 64),
        "libssdopt_nms_tensorrt.so",
        "rebuild the engine",
    )
    assert loaded == []
    _load_plugin(trt, None, plugin, sha256_file(plugin))  # matching bytes do load
    assert loaded == [str(plugin)]


def test_openvino_extension_is_verified_before_it_is_added(api_refused, tmp_path, monkeypatch) -> None:
    from ssdopt.backends import openvino as backend

    meta = {"has_decode_nms": True, "plugin": {"sha256": "d" * 64}, "settings": {"compile_config": {}}}
    monkeypatch.setattr(backend, "check_engine", lambda *a, **k: meta)
    monkeypatch.setattr(
        backend.OpenVinoBackend, "nms_plugin", lambda self: {"path": "ext.so", "sha256": "e" * 64}
    )
    added: list[bool] = []
    monkeypatch.setattr(backend, "_core", lambda with_nms: added.append(with_nms))
    api_refused(
        "OpenVinoBackend.load(<engine whose extension library changed>)",
        lambda: backend.OpenVinoBackend().load(tmp_path),
        "SSDDecodeNMS library",
        "rebuild",
    )
    assert added == []


# ---- atomic outputs ---------------------------------------------------------------------------------


def test_a_failed_writer_removes_the_folders_it_made(tmp_path: Path) -> None:
    from ssdopt.fileio import created_dirs

    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(SsdoptError), created_dirs(target):
        assert target.is_dir()
        raise SsdoptError("x", "y", "z")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError), created_dirs(tmp_path / "keep" / "new"):
        (tmp_path / "keep" / "new" / "file").write_text("partial")  # not empty: left for inspection
        raise RuntimeError
    assert (tmp_path / "keep" / "new" / "file").is_file()


def test_write_json_is_atomic(tmp_path: Path) -> None:
    from ssdopt.fileio import atomic_write, write_json

    path = write_json({"b": 1, "a": [1.5, "é"]}, tmp_path / "out" / "x.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1.5, "é"], "b": 1}
    before = path.read_bytes()

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise ValueError("disk full")

    with pytest.raises(ValueError):
        atomic_write(path, fail)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["x.json"]
