"""Find, build (once, cached) and load the SSDDecodeNMS native libraries, checking their sha256 first.

* load_torch_ops(): registers torch.ops.ssdopt.decode_nms (CPU, and CUDA where built) plus its fake
  implementation for torch.export / AOTInductor.
* load_cpu_library(): ctypes handle on libssdopt_nms_cpu.so (C ABI of include/ssdopt_nms_c.h), with
  argument types set; what the ONNX Runtime binding calls.
Environment: SSDOPT_BUILD_DIR moves build/plugins; SSDOPT_NMS_CUDA=0/1 forces the torch op's CUDA part
off/on; SSDOPT_NMS_CPU_LIBRARY points at a prebuilt libssdopt_nms_cpu.so (its build.json, if any, is
checked).
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path

from ssdopt import plugin_build
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

_lock = threading.Lock()
_cpu_library: ctypes.CDLL | None = None
_torch_library_path: Path | None = None


class SsdoptNmsParams(ctypes.Structure):
    """ctypes mirror of SsdoptNmsParams (include/ssdopt_nms_c.h, 52 bytes)."""

    _fields_ = [
        ("score_threshold", ctypes.c_float),
        ("iou_threshold", ctypes.c_float),
        ("pre_nms_top_k", ctypes.c_int32),
        ("max_detections", ctypes.c_int32),
        ("box_weights", ctypes.c_float * 4),
        ("softmax", ctypes.c_int32),
        ("background_class", ctypes.c_int32),
        ("class_agnostic", ctypes.c_int32),
        ("image_height", ctypes.c_int32),
        ("image_width", ctypes.c_int32),
    ]


C_ABI_VERSION = 1
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1


def build_root() -> Path:
    return Path(os.environ.get("SSDOPT_BUILD_DIR", plugin_build.DEFAULT_BUILD_ROOT))


def cuda_choice() -> bool | None:
    value = os.environ.get("SSDOPT_NMS_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SsdoptError("SSDOPT_NMS_CUDA", "0, 1 or auto", "fix or unset the variable")


def verified_library(path: Path, expected_sha256: str | None) -> Path:
    """`path` after checking it exists and, when a hash is recorded, that its bytes still match it."""
    if not path.exists():
        raise SsdoptError(path, "a built library", "run `ssdopt plugin build`")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise SsdoptError(
                path,
                f"sha256 {expected_sha256} as recorded in build.json, found {actual}",
                f"delete {path.parent.parent} and rerun `ssdopt plugin build`",
            )
    return path


def recorded_sha256(library: Path) -> str | None:
    """sha256 recorded for `library` in the build.json of its build folder (lib/../build.json), if any."""
    record = library.parent.parent / "build.json"
    if not record.exists():
        return None
    try:
        entry = json.loads(record.read_text()).get("libraries", {}).get(library.name)
        return str(entry["sha256"]) if entry else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise SsdoptError(
            record,
            f"a build record with the sha256 of {library.name} ({type(exc).__name__}: {exc})",
            f"delete {library.parent.parent} and rerun `ssdopt plugin build`",
        ) from exc


def torch_op_registered() -> bool:
    import torch

    try:
        torch.ops.ssdopt.decode_nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def load_torch_ops() -> Path | None:
    """Make torch.ops.ssdopt.decode_nms available; returns the library loaded (None if already there)."""
    global _torch_library_path
    import torch

    with _lock:
        if torch_op_registered():
            return _torch_library_path
        build = plugin_build.build_torch_ops(build_root=build_root(), cuda=cuda_choice())
        name = f"{plugin_build.TORCH_EXTENSION_NAME}.so"
        path = verified_library(build.library(name), build.record["libraries"][name]["sha256"])
        torch.ops.load_library(str(path))
        register_fake_decode_nms()
        _torch_library_path = path
        return path


def register_fake_decode_nms() -> None:
    """Shapes-only implementation used by FakeTensor tracing (torch.export, AOTInductor)."""
    import torch

    @torch.library.register_fake("ssdopt::decode_nms")
    def _fake(
        box_deltas,
        class_logits,
        anchors,
        score_threshold,
        iou_threshold,
        pre_nms_top_k,  # noqa: ANN001
        max_detections,
        box_weights,
        softmax,
        background_class,
        class_agnostic,
        image_height,
        image_width,
    ):
        batch = box_deltas.shape[0]
        options = {"device": box_deltas.device}
        return (
            box_deltas.new_empty((batch,), dtype=torch.int32, **options),
            box_deltas.new_empty((batch, max_detections, 4), dtype=torch.float32, **options),
            box_deltas.new_empty((batch, max_detections), dtype=torch.float32, **options),
            box_deltas.new_empty((batch, max_detections), dtype=torch.int32, **options),
        )


def cpu_library_path() -> Path:
    """libssdopt_nms_cpu.so: $SSDOPT_NMS_CPU_LIBRARY, else the CPU-only native build (built if missing)."""
    override = os.environ.get("SSDOPT_NMS_CPU_LIBRARY")
    if override:
        path = Path(override)
        return verified_library(path, recorded_sha256(path))
    return native_cpu_library("libssdopt_nms_cpu.so")


def native_cpu_library(name: str) -> Path:
    """A library of the CPU-only native build (C ABI, OpenVINO extension where openvino is installed).

    One cached build serves every caller: CUDA off, bindings on (each built where its SDK is found).
    """
    build = plugin_build.build_native(build_root=build_root(), cuda=False, bindings=True)
    return verified_library(build.library(name), build.record["libraries"][name]["sha256"])


def load_cpu_library() -> ctypes.CDLL:
    """The C-ABI CPU kernel through ctypes, argument types declared, ABI version checked."""
    global _cpu_library
    with _lock:
        if _cpu_library is not None:
            return _cpu_library
        path = cpu_library_path()
        rebuild = "point SSDOPT_NMS_CPU_LIBRARY at a library built by `ssdopt plugin build`, or unset it"
        try:
            lib = ctypes.CDLL(str(path))
            version = lib.ssdopt_nms_abi_version
        except (OSError, AttributeError) as exc:  # not a shared library / not the SSDDecodeNMS one
            raise SsdoptError(
                path, f"the SSDDecodeNMS CPU library with C ABI version {C_ABI_VERSION} ({exc})", rebuild
            ) from exc
        version.restype = ctypes.c_int
        version.argtypes = []
        found = version()
        if found != C_ABI_VERSION:
            raise SsdoptError(path, f"C ABI version {C_ABI_VERSION}, found {found}", rebuild)
        lib.ssdopt_nms_params_default.restype = None
        lib.ssdopt_nms_params_default.argtypes = [ctypes.POINTER(SsdoptNmsParams)]
        lib.ssdopt_nms_last_error.restype = ctypes.c_char_p
        lib.ssdopt_nms_last_error.argtypes = []
        lib.ssdopt_nms_decode_cpu.restype = ctypes.c_int
        lib.ssdopt_nms_decode_cpu.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(SsdoptNmsParams),
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        _cpu_library = lib
        return lib


def make_c_params(**attributes: object) -> SsdoptNmsParams:
    """SsdoptNmsParams from keyword attributes (names and defaults of DecodeNmsAttributes)."""
    from ssdopt.ops.reference import DecodeNmsAttributes

    attrs = DecodeNmsAttributes(**attributes)  # type: ignore[arg-type]
    if len(attrs.box_weights) != 4:
        raise SsdoptError("box_weights", "4 values", "pass (wx, wy, ww, wh)")
    return SsdoptNmsParams(
        score_threshold=attrs.score_threshold,
        iou_threshold=attrs.iou_threshold,
        pre_nms_top_k=min(attrs.pre_nms_top_k, 2**31 - 1),
        max_detections=attrs.max_detections,
        box_weights=(ctypes.c_float * 4)(*attrs.box_weights),
        softmax=int(attrs.softmax),
        background_class=attrs.background_class,
        class_agnostic=int(attrs.class_agnostic),
        image_height=attrs.image_height,
        image_width=attrs.image_width,
    )


def decode_nms_numpy(box_deltas, class_logits, anchors, **attributes: object):  # noqa: ANN001, ANN201
    """Run the C-ABI CPU kernel on numpy arrays.

    box_deltas [B, A, 4], class_logits [B, A, C] (both float32 or both float16), anchors [A, 4].
    Returns (num_detections int32 [B], boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K]).
    """
    import numpy as np

    half = box_deltas.dtype == np.float16 and class_logits.dtype == np.float16
    dtype = np.float16 if half else np.float32
    deltas = np.ascontiguousarray(box_deltas, dtype=dtype)
    logits = np.ascontiguousarray(class_logits, dtype=dtype)
    anchors = np.ascontiguousarray(anchors, dtype=np.float32)
    if deltas.ndim != 3 or deltas.shape[2] != 4 or logits.ndim != 3 or logits.shape[:2] != deltas.shape[:2]:
        raise SsdoptError(
            "box_deltas/class_logits",
            f"[B, A, 4] and [B, A, C], got {deltas.shape} and {logits.shape}",
            "pass the SSD head outputs unflattened",
        )
    if anchors.shape != (deltas.shape[1], 4):
        raise SsdoptError(
            "anchors", f"[{deltas.shape[1]}, 4], got {anchors.shape}", "pass the model's anchors"
        )
    params = make_c_params(**attributes)
    batch, k = deltas.shape[0], params.max_detections
    num = np.empty(batch, np.int32)
    boxes = np.empty((batch, k, 4), np.float32)
    scores = np.empty((batch, k), np.float32)
    labels = np.empty((batch, k), np.int32)
    lib = load_cpu_library()
    status = lib.ssdopt_nms_decode_cpu(
        DTYPE_FLOAT16 if half else DTYPE_FLOAT32,
        deltas.ctypes.data,
        logits.ctypes.data,
        anchors.ctypes.data,
        batch,
        deltas.shape[1],
        logits.shape[2],
        ctypes.byref(params),
        num.ctypes.data,
        boxes.ctypes.data,
        scores.ctypes.data,
        labels.ctypes.data,
    )
    if status != 0:
        message = lib.ssdopt_nms_last_error().decode()
        raise SsdoptError(
            "SSDDecodeNMS attributes/inputs", f"valid values ({message})", "fix the named value"
        )
    return num, boxes, scores, labels
