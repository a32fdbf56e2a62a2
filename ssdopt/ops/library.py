"""Find, build (once, cached) and load the SSDDecodeNMS native libraries, checking their sha256 first.

* load_torch_ops(): registers torch.ops.ssdopt.decode_nms (CPU, and CUDA where built) plus its fake
  implementation for torch.export / AOTInductor.
* load_cpu_library(): ctypes handle on libssdopt_nms_cpu.so (C ABI of include/ssdopt_nms_c.h), with
  argument types set; what the ONNX Runtime binding calls.
* use_cpu_library() / use_torch_ops(): the same, from a given (verified) file, e.g. the copy an engine
  carries; a process holds one of each, so a second engine must name the same bytes.
* cached_library(): a library of the content-addressed build cache, found by name and sha256.
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
_cpu_library: ctypes.CDLL | None = None  # carries the sha256 of its file as ._ssdopt_sha256
_torch_library_path: Path | None = None
_torch_library_sha256: str | None = None


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


def cached_library(name: str, sha256: str, root: Path | None = None) -> Path | None:
    """The library `name` with bytes of `sha256` in the build cache (build_root()/*/lib/), or None.

    Found by content, not by path: any build folder whose build.json records that sha256 and whose file
    still hashes to it. Unreadable records are skipped (they cannot vouch for anything).
    """
    root = root or build_root()
    if not root.is_dir():
        return None
    for record_path in sorted(root.glob("*/build.json")):
        try:
            entry = json.loads(record_path.read_text()).get("libraries", {}).get(name) or {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if not isinstance(entry, dict) or entry.get("sha256") != sha256:
            continue
        path = record_path.parent / "lib" / name
        if path.is_file() and sha256_file(path) == sha256:
            return path
    return None


def _another_library(
    kind: str, loaded: Path | None, loaded_sha: str | None, wanted: Path, sha: str
) -> SsdoptError:
    return SsdoptError(
        wanted,
        f"the {kind} this process already loaded ({loaded}, sha256 {str(loaded_sha)[:16]}...) to be the "
        f"same bytes, found sha256 {sha[:16]}... (one process holds one {kind})",
        "load engines built with different SSDDecodeNMS libraries in separate processes, or rebuild them",
    )


def torch_op_registered() -> bool:
    import torch

    try:
        torch.ops.ssdopt.decode_nms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def load_torch_ops() -> Path | None:
    """Make torch.ops.ssdopt.decode_nms available; returns the library loaded (None if already there)."""
    global _torch_library_path, _torch_library_sha256
    import torch

    with _lock:
        if torch_op_registered():
            return _torch_library_path
        build = plugin_build.build_torch_ops(build_root=build_root(), cuda=cuda_choice())
        name = f"{plugin_build.TORCH_EXTENSION_NAME}.so"
        sha256 = build.record["libraries"][name]["sha256"]
        path = verified_library(build.library(name), sha256)
        torch.ops.load_library(str(path))
        register_fake_decode_nms()
        _torch_library_path, _torch_library_sha256 = path, sha256
        return path


def use_torch_ops(path: Path, sha256: str) -> Path:
    """Register ssdopt::decode_nms from `path` (checked against `sha256` first); returns the library in use.

    When the op is already registered from a library of the same sha256 that one stays; another sha256
    is refused (torch cannot replace a TORCH_LIBRARY namespace within a process).
    """
    global _torch_library_path, _torch_library_sha256
    import torch

    with _lock:
        if torch_op_registered():
            if _torch_library_sha256 not in (None, sha256):
                raise _another_library(
                    "ssdopt torch op library", _torch_library_path, _torch_library_sha256, path, sha256
                )
            return _torch_library_path or path
        verified_library(path, sha256)
        torch.ops.load_library(str(path))
        register_fake_decode_nms()
        _torch_library_path, _torch_library_sha256 = path, sha256
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


def use_cpu_library(path: Path, sha256: str) -> ctypes.CDLL:
    """The C-ABI CPU kernel from `path` (checked against `sha256` before it is loaded), e.g. an engine's copy.

    An already loaded kernel with the same sha256 is kept; another one is refused (the process has one).
    """
    with _lock:
        if _cpu_library is not None:
            loaded_sha = getattr(_cpu_library, "_ssdopt_sha256", None)
            if loaded_sha != sha256:
                loaded = Path(_cpu_library._name)
                raise _another_library("SSDDecodeNMS CPU library", loaded, loaded_sha, path, sha256)
            return _cpu_library
        return _open_cpu_library(verified_library(path, sha256))


def load_cpu_library() -> ctypes.CDLL:
    """The C-ABI CPU kernel through ctypes, argument types declared, ABI version checked."""
    with _lock:
        if _cpu_library is not None:
            return _cpu_library
        return _open_cpu_library(cpu_library_path())


def _open_cpu_library(path: Path) -> ctypes.CDLL:
    """ctypes.CDLL of a verified `path`, ABI checked, kept as the process's kernel (caller holds _lock)."""
    global _cpu_library
    sha256 = sha256_file(path)
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
    lib._ssdopt_sha256 = sha256  # what use_cpu_library compares an engine's library with
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
