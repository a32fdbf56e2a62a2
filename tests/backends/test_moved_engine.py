"""Engines that move (issue 15, item 4): an engine directory carries the SSDDecodeNMS library it was built
with (plugins/<name>, recorded relative to the engine with its sha256) and loads from another path, with
the plugin build cache gone and the SDK in another virtual env; a changed copy is refused before loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py

from ssdopt import plugin_build
from ssdopt.backends import BuildSpec, CalibrationSpec, Detections, get_backend
from ssdopt.build import build_engine, build_key
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.ops import library

LIBRARY = {"openvino": "libssdopt_nms_openvino.so", "onnxruntime": "libssdopt_nms_cpu.so"}
BACKENDS = ["openvino", "onnxruntime"]

# Run in a fresh process: load the engine from argv[1], run it on argv[2] (.npy), write argv[3] (.npz).
# Building any plugin there fails the run: a moved engine must load what it carries.
LOAD_ELSEWHERE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from ssdopt import plugin_build


    def no_build(*args, **kwargs):
        raise SystemExit("loading the moved engine tried to build the SSDDecodeNMS plugin")


    plugin_build.build_native = plugin_build.build_torch_ops = no_build
    # Another virtual env: the SDK is somewhere else (loading must not ask where).
    plugin_build.openvino_cmake_dir = lambda: Path(sys.argv[4]) / "openvino" / "cmake"

    from ssdopt.backends import get_backend

    engine = Path(sys.argv[1])
    runner = get_backend(sys.argv[5]).load(engine)
    got = runner.infer(np.load(sys.argv[2]))
    np.savez(sys.argv[3], num=got.num_detections, boxes=got.boxes, scores=got.scores, labels=got.labels)
    """
)


@pytest.fixture(scope="module")
def nms_model(tiny_export, tmp_path_factory):  # noqa: ANN001, ANN201
    return tiny.with_decode_nms(tiny_export.model, tmp_path_factory.mktemp("moved-nms") / "model.onnx")


@pytest.fixture(scope="module")
def engines(nms_model, tmp_path_factory):  # noqa: ANN001, ANN201
    """fp32 engines with the fused NMS node; tests that change one work on a copy."""
    out = tmp_path_factory.mktemp("moved-engines")
    return {backend: build_engine(backend, "fp32", nms_model, out) for backend in BACKENDS}


def _copy(engine_dir: Path, to: Path) -> Path:
    shutil.copytree(engine_dir, to)
    return to


def _edit_plugin(engine_dir: Path, record: dict) -> None:
    path = engine_dir / "metadata.json"
    meta = json.loads(path.read_text())
    meta["plugin"] = record
    path.write_text(json.dumps(meta))


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _named(detections: Detections) -> dict[str, np.ndarray]:
    return {
        "num": detections.num_detections,
        "boxes": detections.boxes,
        "scores": detections.scores,
        "labels": detections.labels,
    }


def _assert_same(got: dict[str, np.ndarray], want: Detections) -> None:
    """The same detections: the same library, graph and CPU give the same numbers."""
    expected = _named(want)
    np.testing.assert_array_equal(got["num"], expected["num"])
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_records_its_plugin_relative_to_itself(backend, engines) -> None:
    engine = engines[backend]
    plugin = engine.metadata["plugin"]
    assert plugin["file"] == f"plugins/{LIBRARY[backend]}" and "path" not in plugin
    copy = engine.path / plugin["file"]
    assert plugin["sha256"] == sha256_file(copy)
    cached = library.cached_library(LIBRARY[backend], plugin["sha256"])
    assert cached is not None and cached != copy  # the same bytes as the build cache's library
    text = (engine.path / "metadata.json").read_text()
    for location in (sys.prefix, str(plugin_build.REPO_ROOT / "build"), str(library.build_root())):
        assert location not in text, f"{location} recorded in metadata.json"
    absolute = [s for s in _strings(engine.metadata) if s.startswith("/")]
    # Only provenance may be absolute (where the ONNX was); nothing that loading reads.
    assert absolute == [engine.metadata["source_onnx"]["path"]], absolute


@pytest.mark.parametrize("backend", BACKENDS)
def test_moved_engine_loads_in_a_fresh_process_without_the_build_cache(backend, nms_model, tmp_path) -> None:
    origin = build_engine(backend, "fp32", nms_model, tmp_path / "origin")
    seed = int(np.random.default_rng().integers(1 << 31))
    images = tiny.fresh_images(3, seed=seed)
    with get_backend(backend).load(origin.path) as runner:
        want = runner.infer(images)
    assert isinstance(want, Detections) and want.num_detections.sum() > 0, seed

    moved = tmp_path / "another" / "machine" / origin.path.name
    moved.parent.mkdir(parents=True)
    shutil.move(origin.path, moved)
    assert not origin.path.exists()
    empty_cache = tmp_path / "empty-build-cache"
    empty_cache.mkdir()
    np.save(tmp_path / "images.npy", images)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SSDOPT_NMS_OPENVINO_EXTENSION", "SSDOPT_NMS_CPU_LIBRARY")
    }
    env["SSDOPT_BUILD_DIR"] = str(empty_cache)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_ELSEWHERE,
            str(moved),
            str(tmp_path / "images.npy"),
            str(tmp_path / "got.npz"),
            str(tmp_path / "other-venv"),
            backend,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(empty_cache.iterdir()) == []  # nothing was built or looked up there
    _assert_same(dict(np.load(tmp_path / "got.npz")), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tampered_plugin_copy_is_refused_before_it_is_loaded(
    backend, engines, tmp_path, monkeypatch
) -> None:
    import ctypes

    from ssdopt.ops import openvino as ov_ops

    engine = _copy(engines[backend].path, tmp_path / "engine")
    recorded = engines[backend].metadata["plugin"]["sha256"]
    copy = engine / "plugins" / LIBRARY[backend]
    copy.write_bytes(copy.read_bytes() + b"\0")
    loaded: list[str] = []
    real_cdll, real_add = ctypes.CDLL, ov_ops.add_nms_extension
    monkeypatch.setattr(library, "_cpu_library", None)  # ORT: nothing loaded yet, so a load would show
    monkeypatch.setattr(
        ctypes, "CDLL", lambda path, *a, **k: loaded.append(str(path)) or real_cdll(path, *a, **k)
    )
    monkeypatch.setattr(
        ov_ops, "add_nms_extension", lambda core, lib=None: loaded.append(str(lib)) or real_add(core, lib)
    )
    with pytest.raises(SsdoptError) as info:
        get_backend(backend).load(engine)
    error = info.value
    assert error.what == str(copy)
    assert f"sha256 {recorded} as recorded in {engine / 'metadata.json'}" in error.expected
    assert "changed after the build" in error.expected
    assert "copy the engine directory again" in error.fix and "ssdopt build --backend" in error.fix
    assert loaded == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_its_copy_the_plugin_is_found_in_the_build_cache_by_sha256(
    backend, engines, tmp_path, monkeypatch
) -> None:
    engine = _copy(engines[backend].path, tmp_path / "engine")
    shutil.rmtree(engine / "plugins")
    images = tiny.fresh_images(2, seed=5)
    with get_backend(backend).load(engines[backend].path) as runner:
        want = runner.infer(images)
    with get_backend(backend).load(engine) as runner:  # the build cache holds those bytes
        _assert_same(_named(runner.infer(images)), want)
    monkeypatch.setenv("SSDOPT_BUILD_DIR", str(tmp_path / "empty"))
    with pytest.raises(SsdoptError) as info:
        get_backend(backend).load(engine)
    message = str(info.value)
    assert info.value.what == str(engine)
    assert LIBRARY[backend] in message and engines[backend].metadata["plugin"]["sha256"][:16] in message
    assert "plugins/ folder included" in info.value.fix and "ssdopt build" in info.value.fix


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_engine_recorded_with_an_absolute_plugin_path_still_loads_where_it_was_built(
    backend, engines, tmp_path, monkeypatch
) -> None:
    """Metadata written before engines carried their plugin: {"path": <absolute>, "sha256"}."""
    plugin = engines[backend].metadata["plugin"]
    cached = library.cached_library(LIBRARY[backend], plugin["sha256"])
    engine = _copy(engines[backend].path, tmp_path / "engine")
    shutil.rmtree(engine / "plugins")
    legacy = tmp_path / "old-build" / "lib" / LIBRARY[backend]
    legacy.parent.mkdir(parents=True)
    shutil.copyfile(cached, legacy)
    _edit_plugin(engine, {"path": str(legacy), "sha256": plugin["sha256"], "binding": plugin["binding"]})
    monkeypatch.setenv("SSDOPT_BUILD_DIR", str(tmp_path / "empty"))  # only the recorded path can serve
    images = tiny.fresh_images(2, seed=6)
    with get_backend(backend).load(engine) as runner:
        got = runner.infer(images)
    with get_backend(backend).load(engines[backend].path) as runner:
        _assert_same(_named(got), runner.infer(images))
    legacy.unlink()
    with pytest.raises(SsdoptError) as info:
        get_backend(backend).load(engine)
    assert str(legacy) in info.value.expected
    assert "built before engines carried their plugin" in info.value.fix and "rebuild" in info.value.fix


@pytest.mark.parametrize("recorded", ["/etc/passwd", "../../elsewhere/lib.so"])
def test_a_plugin_file_outside_the_engine_is_refused(engines, tmp_path, recorded) -> None:
    engine = _copy(engines["openvino"].path, tmp_path / "engine")
    _edit_plugin(engine, {**engines["openvino"].metadata["plugin"], "file": recorded})
    with pytest.raises(SsdoptError, match="relative to the engine directory"):
        get_backend("openvino").load(engine)


def test_the_plugin_build_key_ignores_where_the_sdk_and_compiler_are(monkeypatch, tmp_path) -> None:
    key, config = plugin_build.native_key(cuda=False, bindings=True)
    assert config["openvino_dir"] and config["openvino"]  # this test needs the openvino wheel
    other = tmp_path / "other-venv" / "lib" / "python3.11" / "site-packages" / "openvino" / "cmake"
    monkeypatch.setattr(plugin_build, "openvino_cmake_dir", lambda: other)
    moved_key, moved = plugin_build.native_key(cuda=False, bindings=True)
    assert moved["openvino_dir"] == str(other) != config["openvino_dir"]
    assert moved_key == key
    arguments = plugin_build.cmake_arguments(
        moved, plugin_build.PLUGIN_SOURCE_DIR, tmp_path / "b" / "cmake", tmp_path
    )
    assert f"-DOpenVINO_DIR={other}" in arguments  # CMake still gets the location
    assert f"-ffile-prefix-map={other.parent}=openvino" in " ".join(arguments)
    monkeypatch.setattr(plugin_build, "openvino_version", lambda: "2099.1.0-other-build")
    assert plugin_build.native_key(cuda=False, bindings=True)[0] != key  # what is installed does count


def test_the_engine_key_holds_contents_not_locations(nms_model, tiny_calibration, tmp_path) -> None:
    moved_set = _copy(tiny_calibration, tmp_path / "calibration-elsewhere")
    plugin_a = tmp_path / "a" / "libplugin.so"
    plugin_b = tmp_path / "b" / "libplugin.so"
    for path in (plugin_a, plugin_b):
        path.parent.mkdir()
        path.write_bytes(b"the same plugin bytes")

    def key(directory: Path, plugin: Path) -> str:
        from ssdopt.quantize.calibration_reader import calibration_version

        spec = BuildSpec(
            precision="int8", calibration=CalibrationSpec(directory=directory), plugin_library=plugin
        )
        return build_key("openvino", "1", nms_model, spec, calibration_version(directory), "f" * 64)

    assert key(tiny_calibration, plugin_a) == key(moved_set, plugin_b)
    plugin_b.write_bytes(b"other plugin bytes")
    assert key(tiny_calibration, plugin_a) != key(moved_set, plugin_b)
