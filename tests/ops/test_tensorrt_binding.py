"""SSDDecodeNMS as a TensorRT IPluginV3 (plugins/nms/bindings/tensorrt).

Two levels, each skipped with its reason where it cannot run:
  * host check (needs TensorRT headers: TRT_INCLUDE_DIR, plus g++ and CUDA's cuda_runtime_api.h): compiles
    the plugin with -Werror and drives it the way the builder, ONNX parser and runtime do, against a recording
    stand-in for the CUDA kernel (plugin_host_check.cpp);
  * engine (needs `import tensorrt` and a CUDA GPU): parses an ONNX graph with the SSDDecodeNMS node, builds
    an engine with a dynamic batch, runs it and compares with the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from nms_matching import compare_detections, random_head_outputs
from nms_onnx_graphs import decode_nms_model
from onnx import TensorProto

from ssdopt.ops import reference_decode_nms

REPO = Path(__file__).resolve().parents[2]
NMS = REPO / "plugins" / "nms"
TRT_LOOKUP = {"plugin_version": "1", "plugin_namespace": "ssdopt"}


def cuda_include_dir() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def test_plugin_host_check_against_tensorrt_headers(tmp_path: Path):
    include = os.environ.get("TRT_INCLUDE_DIR")
    if not include or not (Path(include) / "NvInferRuntime.h").exists():
        pytest.skip("TRT_INCLUDE_DIR does not point at TensorRT headers (NvInferRuntime.h)")
    compiler = shutil.which("g++")
    cuda_include = cuda_include_dir()
    if compiler is None or cuda_include is None:
        pytest.skip("needs g++ and CUDA's cuda_runtime_api.h (CUDA_HOME or /usr/local/cuda)")
    binary = tmp_path / "plugin_host_check"
    command = [
        compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
        "-isystem", include, "-isystem", str(cuda_include), f"-I{NMS / 'include'}",
        str(NMS / "bindings/tensorrt/ssdopt_nms_trt.cpp"),
        str(NMS / "bindings/tensorrt/plugin_host_check.cpp"),
        str(NMS / "src/common/validate.cpp"), "-o", str(binary),
    ]  # fmt: skip
    build = subprocess.run(command, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout


# ---- engine test (TensorRT container with a GPU) ----------------------------------------------------------


def tensorrt_or_skip():  # noqa: ANN201
    try:
        import tensorrt
    except ImportError as exc:
        pytest.skip(f"import tensorrt failed ({exc}); TensorRT installs only from NVIDIA's index / container")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    return tensorrt


def plugin_library() -> Path:
    """$SSDOPT_NMS_TRT_PLUGIN (e.g. built into the Docker image), else a native build with CUDA + bindings."""
    from ssdopt import plugin_build
    from ssdopt.ops.library import build_root

    if os.environ.get("SSDOPT_NMS_TRT_PLUGIN"):
        return Path(os.environ["SSDOPT_NMS_TRT_PLUGIN"])
    if plugin_build.find_cuda_home() is None:
        pytest.skip("no nvcc to build libssdopt_nms_trt.so (set CUDA_HOME or SSDOPT_NMS_TRT_PLUGIN)")
    build = plugin_build.build_native(build_root=build_root(), cuda=True, bindings=True)
    return build.library("libssdopt_nms_trt.so")


def build_engine(trt, onnx_bytes: bytes, num_anchors: int, num_classes: int, max_batch: int):  # noqa: ANN001, ANN201
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(
        "box_deltas", (1, num_anchors, 4), (max_batch, num_anchors, 4), (max_batch, num_anchors, 4)
    )
    profile.set_shape("class_logits", (1, num_anchors, num_classes), (max_batch, num_anchors, num_classes),
                      (max_batch, num_anchors, num_classes))  # fmt: skip
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "engine build failed (see the TensorRT log above)"
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_engine(engine, deltas: torch.Tensor, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    context = engine.create_execution_context()
    batch = deltas.shape[0]
    inputs = {"box_deltas": deltas.cuda().contiguous(), "class_logits": logits.cuda().contiguous()}
    outputs = {
        "num_detections": torch.empty(batch, dtype=torch.int32, device="cuda"),
        "boxes": torch.empty(batch, k, 4, dtype=torch.float32, device="cuda"),
        "scores": torch.empty(batch, k, dtype=torch.float32, device="cuda"),
        "labels": torch.empty(batch, k, dtype=torch.int32, device="cuda"),
    }
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name, tensor in outputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return tuple(outputs[name].cpu() for name in ("num_detections", "boxes", "scores", "labels"))


@pytest.mark.parametrize("half", [False, True])
def test_engine_with_plugin_matches_reference(half: bool):
    trt = tensorrt_or_skip()
    registry = trt.get_plugin_registry()
    if registry.get_creator("SSDDecodeNMS", "1", "ssdopt") is None:
        assert registry.load_library(str(plugin_library())) is not None
    assert registry.get_creator("SSDDecodeNMS", "1", "ssdopt") is not None

    attrs = {"max_detections": 100, "pre_nms_top_k": 200}
    deltas, logits, anchors = random_head_outputs(4, 3234, 91, seed=60)
    if half:
        deltas, logits = deltas.half(), logits.half()
    dtype = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    model = decode_nms_model(anchors.numpy(), 91, attrs, dtype=dtype, extra_attributes=TRT_LOOKUP)
    engine = build_engine(trt, model.SerializeToString(), 3234, 91, max_batch=4)
    for batch in (4, 1):  # one engine, two batch sizes
        got = run_engine(engine, deltas[:batch], logits[:batch], k=100)
        ref = reference_decode_nms(deltas[:batch], logits[:batch], anchors, **attrs)
        assert compare_detections(got, ref, attrs) == []
