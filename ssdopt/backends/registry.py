"""The one registry of backends and the precisions they may be asked for.

Kept free of runtime imports so that the CLI can build its help text from it at start-up.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEVICES = ("cpu", "cuda")

# name -> "module:class". One line per backend; the module is imported only when asked for, so a
# missing runtime (tensorrt here) never breaks the others.
BACKENDS: dict[str, str] = {
    "onnxruntime": "ssdopt.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "ssdopt.backends.openvino:OpenVinoBackend",
    "tensorrt": "ssdopt.backends.tensorrt:TensorRtBackend",
    "torch-aoti": "ssdopt.backends.torch_aoti:TorchAotiBackend",
}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def choices(names: tuple[str, ...] | list[str]) -> str:
    """`a | b | c`, the form the CLI's help texts list choices in."""
    return " | ".join(names)
