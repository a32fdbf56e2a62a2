"""SSDDecodeNMS in OpenVINO: load the C++ extension (plugins/nms/bindings/openvino) into an ``ov.Core``.

The extension library holds the ``ssdopt::SSDDecodeNMS`` op (evaluate() runs the C++ CPU kernel) and the ONNX
frontend conversion for domain ``ssdopt``, so after ``add_nms_extension(core)`` both
``core.read_model("model.onnx")`` and reading a saved IR map the node.

    core = openvino.Core()
    add_nms_extension(core)
    compiled = core.compile_model(core.read_model("model.onnx"), "CPU")
"""

from __future__ import annotations

import os
from pathlib import Path

import openvino

from ssdopt import plugin_build
from ssdopt.errors import SsdoptError
from ssdopt.ops.library import build_root, recorded_sha256, verified_library

EXTENSION_NAME = "libssdopt_nms_openvino.so"
EXTENSION_ENV = "SSDOPT_NMS_OPENVINO_EXTENSION"


def extension_path() -> Path:
    """libssdopt_nms_openvino.so: $SSDOPT_NMS_OPENVINO_EXTENSION, else a CPU native build with bindings.

    The native build is cached by content (build/plugins/<sha>/), and its sha256 is checked before use.
    """
    override = os.environ.get(EXTENSION_ENV)
    if override:
        path = Path(override)
        return verified_library(path, recorded_sha256(path))
    build = plugin_build.build_native(build_root=build_root(), cuda=False, bindings=True)
    return verified_library(
        build.library(EXTENSION_NAME), build.record["libraries"][EXTENSION_NAME]["sha256"]
    )


def add_nms_extension(core: openvino.Core, library: Path | None = None) -> Path:
    """Register the SSDDecodeNMS extension in `core`; returns the library loaded.

    Adding it twice to one Core is harmless (OpenVINO keeps one registration per op type).
    """
    path = library or extension_path()
    if not path.is_file():
        raise SsdoptError(path, "the OpenVINO extension library", "run `ssdopt plugin build`")
    try:
        core.add_extension(str(path))
    except RuntimeError as exc:
        raise SsdoptError(
            path,
            f"an extension this OpenVINO ({openvino.__version__}) can load ({exc})",
            "rebuild it against the installed openvino wheel: `ssdopt plugin build`",
        ) from exc
    return path
