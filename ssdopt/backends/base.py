"""The backend interface every runtime implements, the values it exchanges, and the one registry.

A backend turns an ONNX graph (already in its precision: fp32, fp16 or Q/DQ int8) into an engine
directory and runs it. Callers never branch on the runtime: they look a backend up by name in
`BACKENDS` and use `available`, `build`, `load` and `layers`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ssdopt.backends.registry import BACKENDS, PRECISIONS, backend_names
from ssdopt.errors import SsdoptError
from ssdopt.quantize.calibration_reader import CALIBRATION_METHODS, CalibrationSpec

# re-exported: CalibrationSpec is part of BuildSpec; the registry is looked up through this module
__all__ = ["BACKENDS", "CALIBRATION_METHODS", "PRECISIONS", "CalibrationSpec", "backend_names"]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can build/run here, and if not, why (with the fix)."""

    ok: bool
    reason: str = ""
    version: str | None = None
    device: str | None = None
    precisions: tuple[str, ...] = ()
    why_not: dict[str, str] = field(default_factory=dict)  # precision -> why this device lacks it

    def require(self, backend: str, precision: str | None = None) -> None:
        """Raise SsdoptError unless the backend (and `precision`, when given) works here."""
        if not self.ok:
            raise SsdoptError(f"backend '{backend}'", "an installed, usable runtime", self.reason)
        if precision is not None and precision not in self.precisions:
            reason = self.why_not.get(precision, "")
            raise SsdoptError(
                f"--precision {precision} for backend '{backend}'",
                f"one this runtime supports on {self.device or 'this device'}: {', '.join(self.precisions)}"
                + (f" ({reason})" if reason else ""),
                "pick one of those, or build on a device that supports it",
            )


INT8_QUANTIZERS = ("auto", "nncf", "onnxruntime")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that decides an engine's content besides the ONNX graph itself.

    Only fields that change the engine belong here: they all enter the content key.
    """

    precision: str = "fp32"
    device: str = "cpu"  # "cpu" or "cuda" (onnxruntime CUDA EP, tensorrt)
    max_batch: int = 8  # tensorrt optimisation profile: batch 1..max_batch
    opt_batch: int = 1
    threads: int | None = None  # intra-op threads; None: the runtime's default
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    per_channel: bool = True
    int8_exclude: tuple[str, ...] = ()  # node names kept in float (accuracy fallback)
    int8_preprocess: bool = True  # onnxruntime quant_pre_process where it works
    # onnxruntime int8: time node groups (depthwise convs, Mul, Add) int8 vs float at build, keep the
    # faster (ssdopt.quantize.latency); off by default: on the AVX-512 VNNI Xeon it kept none (~25 s)
    int8_latency_probe: bool = False
    fp16_keep_ops: tuple[str, ...] = ()  # extra op types kept fp32 on top of quantize.fp16's block list
    plugin_library: Path | None = None  # native SSDDecodeNMS library (tensorrt plugin)
    workspace_mib: int = 2048
    timing_cache: Path | None = None  # tensorrt: persistent timing cache file (not part of the key)
    hardware_compatible: bool = False  # tensorrt: Ampere+ compatible engine
    version_compatible: bool = False  # tensorrt: lean-runtime compatible engine
    # int8 from a float graph: "auto" = per backend (openvino: NNCF PTQ on the OpenVINO model;
    # onnxruntime: our ORT Q/DQ; tensorrt: ModelOpt); "onnxruntime": ORT-made Q/DQ for openvino too
    int8_quantizer: str = "auto"
    performance_hint: str = "LATENCY"  # openvino PERFORMANCE_HINT: LATENCY or THROUGHPUT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SsdoptError(
                f"--precision {self.precision}", f"one of {', '.join(PRECISIONS)}", "fix the flag"
            )
        if self.device not in ("cpu", "cuda"):
            raise SsdoptError(f"device '{self.device}'", "cpu or cuda", "fix build.device")
        if self.int8_quantizer not in INT8_QUANTIZERS:
            raise SsdoptError(
                f"int8 quantizer '{self.int8_quantizer}'",
                f"one of {', '.join(INT8_QUANTIZERS)}",
                "fix build.int8_quantizer",
            )
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise SsdoptError(
                f"performance hint '{self.performance_hint}'",
                f"one of {', '.join(PERFORMANCE_HINTS)}",
                "fix build.performance_hint",
            )
        if not 1 <= self.opt_batch <= self.max_batch:
            raise SsdoptError(
                f"--max-batch {self.max_batch} (opt_batch {self.opt_batch})",
                "batch sizes with 1 <= opt_batch <= max_batch",
                "pass --max-batch 1 or more (params: build.max_batch)",
            )

    def key_fields(self) -> dict[str, Any]:
        """The fields that enter the content key, JSON-ready (paths as strings, no timing cache)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "timing_cache":
                continue
            value = getattr(self, f.name)
            if f.name == "calibration":
                value = None if self.precision != "int8" else {k: str(v) for k, v in asdict(value).items()}
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class LayerInfo:
    """One layer/kernel as the runtime reports it after its own optimisation.

    `fused_from` names the source-graph nodes this layer computes (runtime provenance: OpenVINO
    originalLayersNames, TensorRT "a + b + c" names, ONNX Runtime fused-node naming).
    """

    name: str
    type: str
    precision: str | None = None
    fused_from: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "precision": self.precision,
            "fused_from": list(self.fused_from),
            "attributes": self.attributes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerInfo:
        return cls(
            name=data["name"],
            type=data["type"],
            precision=data.get("precision"),
            fused_from=tuple(data.get("fused_from", ())),
            attributes=dict(data.get("attributes", {})),
        )


DETECTION_OUTPUTS = ("num_detections", "boxes", "scores", "labels")
HEAD_OUTPUTS = ("box_deltas", "class_logits")


@dataclass(frozen=True)
class Detections:
    """Fixed-size detections (SSDDecodeNMS layout): num int32 [B], boxes float32 [B, K, 4]
    (x1, y1, x2, y2 in input pixels), scores float32 [B, K], labels int32 [B, K] (padding: -1)."""

    num_detections: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class HeadOutputs:
    """Raw head outputs of a graph without the SSDDecodeNMS node: box_deltas float32 [B, A, 4],
    class_logits float32 [B, A, C]."""

    box_deltas: np.ndarray
    class_logits: np.ndarray

    def decode(self, anchors: np.ndarray, **attributes: Any) -> Detections:
        """Decode + NMS with the reference implementation (torchvision semantics); anchors [A, 4]."""
        import torch

        from ssdopt.ops.reference import reference_decode_nms

        num, boxes, scores, labels = reference_decode_nms(
            torch.from_numpy(np.asarray(self.box_deltas, dtype=np.float32)),
            torch.from_numpy(np.asarray(self.class_logits, dtype=np.float32)),
            torch.from_numpy(np.asarray(anchors, dtype=np.float32)),
            **attributes,
        )
        return Detections(num.numpy(), boxes.numpy(), scores.numpy(), labels.numpy())


def outputs_to_result(named: dict[str, np.ndarray]) -> Detections | HeadOutputs:
    """Named graph outputs -> Detections when the graph ends in SSDDecodeNMS, else HeadOutputs."""
    if all(name in named for name in DETECTION_OUTPUTS):
        return Detections(*(named[name] for name in DETECTION_OUTPUTS))
    if all(name in named for name in HEAD_OUTPUTS):
        return HeadOutputs(*(named[name] for name in HEAD_OUTPUTS))
    raise SsdoptError(
        f"engine outputs {sorted(named)}",
        f"either {list(DETECTION_OUTPUTS)} (graph with SSDDecodeNMS) or {list(HEAD_OUTPUTS)} (raw head)",
        "export the model with ssdopt.export",
    )


@dataclass(frozen=True)
class Engine:
    """A built engine directory: `path/engine.<ext>`, metadata.json, layers.json, fusion.json."""

    path: Path
    metadata: dict[str, Any]

    @property
    def backend(self) -> str:
        return self.metadata["backend"]

    @property
    def precision(self) -> str:
        return self.metadata["precision"]

    @property
    def file(self) -> Path:
        return self.path / self.metadata["engine"]["file"]

    @classmethod
    def open(cls, path: Path | str) -> Engine:
        path = Path(path)
        meta_path = path / "metadata.json"
        if not meta_path.is_file():
            raise SsdoptError(
                meta_path, "an engine directory with metadata.json", "build it with `ssdopt build`"
            )
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise SsdoptError(
                meta_path, f"valid JSON ({exc})", "rebuild the engine with `ssdopt build`"
            ) from exc
        return cls(path, metadata)

    def layers(self) -> list[LayerInfo]:
        """The layers recorded at build time (layers.json)."""
        return [LayerInfo.from_dict(d) for d in json.loads((self.path / "layers.json").read_text())]

    def anchors(self) -> np.ndarray | None:
        """anchors float32 [A, 4] copied from the export, if the export had them."""
        path = self.path / "anchors.npy"
        return np.load(path) if path.is_file() else None


@runtime_checkable
class Runner(Protocol):
    """A loaded engine. `infer` takes a batch float32 [B, 3, H, W] in [0, 1]."""

    input_name: str
    output_names: tuple[str, ...]

    def infer(self, images: Any) -> Detections | HeadOutputs: ...

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    devices: tuple[str, ...]  # first = default

    def available(self) -> Availability: ...

    def build(
        self, onnx: Path, spec: BuildSpec, out: Path, provenance: dict[str, Any] | None = None
    ) -> Engine: ...

    def load(self, engine: Path) -> Runner: ...

    def layers(self, engine: Path) -> list[LayerInfo]: ...


def get_backend(name: str) -> Backend:
    """The backend registered as `name` (its runtime is imported lazily, inside the backend)."""
    if name not in BACKENDS:
        raise SsdoptError(f"--backend {name}", f"one of {', '.join(BACKENDS)}", "pick one of those")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def as_batch(images: Any) -> np.ndarray:
    """np.ndarray or torch.Tensor [B, 3, H, W] (or [3, H, W]) -> contiguous float32 numpy [B, 3, H, W]."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise SsdoptError(
            f"images of shape {array.shape}", "float32 [B, 3, H, W] in [0, 1]", "batch your images"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def check_input_shape(images: np.ndarray, shape: list[int | str]) -> None:
    """Refuse a batch whose [3, H, W] differs from the engine's static input dims (dynamic dims pass)."""
    expected = shape[1:]
    if images.ndim != len(shape) or any(
        isinstance(e, int) and g != e for g, e in zip(images.shape[1:], expected, strict=False)
    ):
        raise SsdoptError(
            f"images of shape {tuple(images.shape)}",
            f"[B, {', '.join(map(str, expected))}] as the engine was built",
            "resize the images to the model's input size",
        )
