"""ssdopt.plugin_build and the loader: cached by content, recorded, verified, clear when tools are missing."""

from __future__ import annotations

import shutil

import pytest

from ssdopt import plugin_build
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.ops import library


def test_native_build_is_cached_recorded_and_verified():
    first = plugin_build.build_native(build_root=library.build_root(), cuda=False, bindings=True)
    again = plugin_build.build_native(build_root=library.build_root(), cuda=False, bindings=True)
    assert again.directory == first.directory == library.cpu_library_path().parent.parent
    assert first.directory.name == first.record["key"][:16]
    assert first.record["targets"]["ssdopt_nms_cpu"] == "built"
    for name, entry in first.record["libraries"].items():
        assert sha256_file(first.directory / "lib" / name) == entry["sha256"]
    assert first.record["cxx_version"] != "unknown" and first.record["cuda_archs"] == []


def test_tampered_library_is_refused(tmp_path):  # noqa: ANN001
    build = plugin_build.build_native(build_root=library.build_root(), cuda=False, bindings=True)
    copy = tmp_path / "lib" / "libssdopt_nms_cpu.so"
    copy.parent.mkdir()
    shutil.copy2(build.library("libssdopt_nms_cpu.so"), copy)
    shutil.copy2(build.directory / "build.json", tmp_path / "build.json")
    assert library.verified_library(copy, library.recorded_sha256(copy)) == copy
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(SsdoptError, match="sha256"):
        library.verified_library(copy, library.recorded_sha256(copy))


def test_content_key_follows_sources_and_configuration(tmp_path):  # noqa: ANN001
    source = tmp_path / "kernel.cpp"
    source.write_text("int f() { return 1; }\n")
    key = plugin_build.content_key([source], tmp_path, {"cuda": False})
    assert key == plugin_build.content_key([source], tmp_path, {"cuda": False})
    assert key != plugin_build.content_key([source], tmp_path, {"cuda": True})
    source.write_text("int f() { return 2; }\n")
    assert key != plugin_build.content_key([source], tmp_path, {"cuda": False})


def test_missing_cmake_says_what_to_install(monkeypatch, tmp_path):  # noqa: ANN001
    real_which = shutil.which
    monkeypatch.setattr(
        plugin_build.shutil, "which", lambda name: None if name == "cmake" else real_which(name)
    )
    with pytest.raises(SsdoptError, match="pip install cmake"):
        plugin_build.build_native(build_root=tmp_path, cuda=False)


def test_cuda_requested_without_nvcc_says_what_to_install(monkeypatch, tmp_path):  # noqa: ANN001
    monkeypatch.setattr(plugin_build, "find_cuda_home", lambda: None)
    with pytest.raises(SsdoptError, match="CUDA toolkit"):
        plugin_build.build_native(build_root=tmp_path, cuda=True)
    with pytest.raises(SsdoptError, match="CUDA toolkit"):
        plugin_build.build_torch_ops(build_root=tmp_path, cuda=True)


def test_library_bytes_do_not_hold_the_checkout_or_the_virtual_env(tmp_path, monkeypatch):  # noqa: ANN001
    """Another checkout and another venv (the openvino wheel seen under another path) build the same
    bytes: what an engine records (sha256) and the build key do not depend on where things are."""
    here = plugin_build.build_native(build_root=library.build_root(), cuda=False, bindings=True)
    real_ov = plugin_build.openvino_cmake_dir()
    assert real_ov is not None and here.record["targets"]["ssdopt_nms_openvino"].startswith("built")
    elsewhere = tmp_path / "checkout" / "plugins" / "nms"
    shutil.copytree(plugin_build.PLUGIN_SOURCE_DIR, elsewhere)
    venv = tmp_path / "venv" / "lib" / "site-packages"
    venv.mkdir(parents=True)
    (venv / "openvino").symlink_to(real_ov.parent, target_is_directory=True)
    monkeypatch.setattr(plugin_build, "openvino_cmake_dir", lambda: venv / "openvino" / "cmake")
    there = plugin_build.build_native(elsewhere, tmp_path / "cache", cuda=False, bindings=True)
    assert there.record["openvino_dir"] == str(venv / "openvino" / "cmake")
    assert there.record["key"] == here.record["key"]
    assert there.record["libraries"] == here.record["libraries"]
    for name in there.record["libraries"]:
        data = there.library(name).read_bytes()
        for location in (str(tmp_path), str(plugin_build.REPO_ROOT), str(real_ov.parent)):
            assert location.encode() not in data, f"{location} in {name}"


def test_a_process_keeps_one_cpu_kernel_and_refuses_other_bytes(tmp_path):  # noqa: ANN001
    from pathlib import Path

    loaded = library.load_cpu_library()
    same = tmp_path / "same" / "libssdopt_nms_cpu.so"  # the same bytes elsewhere (an engine's copy)
    same.parent.mkdir()
    shutil.copy2(loaded._name, same)
    assert library.use_cpu_library(same, sha256_file(same)) is loaded
    other = tmp_path / "libssdopt_nms_cpu.so"
    other.write_bytes(Path(loaded._name).read_bytes() + b"\0")
    with pytest.raises(SsdoptError, match="one process holds one") as info:
        library.use_cpu_library(other, sha256_file(other))
    assert info.value.what == str(other) and "separate processes" in info.value.fix
