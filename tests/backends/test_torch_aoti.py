"""torch-aoti engines of a tiny torchvision SSD (custom 3-block backbone, 64x64 input), built once per
module: detections equal the eager model's head outputs decoded by the reference (torchvision
semantics), metadata and layers come from the artifact, tampering is refused.

The tiny model is a real torchvision `SSD` (transform, anchor generator, SSDHead, postprocess), so the
backend's generic path is exercised; ssdlite320 would take ~50 s per AOTInductor compile here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead

from ssdopt.backends import BuildSpec, Detections
from ssdopt.backends.torch_aoti import (
    AotiOptions,
    TorchAotiBackend,
    decode_attributes,
    layers_from_package,
    resolve_checkpoint,
)
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file, sha256_files
from ssdopt.ops import reference_decode_nms
from ssdopt.ops.reference import pad_detections

IMAGE_SIZE = 64
NUM_CLASSES = 5  # background included
POSTPROCESS = {"score_thresh": 0.05, "nms_thresh": 0.45, "detections_per_img": 40, "topk_candidates": 60}
MAX_BATCH = 4


def _nms_matching():
    """tests/ops/nms_matching.py (set comparison of padded detections with boundary explanations)."""
    name = "ssdopt_tests_nms_matching"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "ops" / "nms_matching.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class TinyBackbone(nn.Module):
    """Conv-BN-ReLU6 / Conv-BN-Hardswish (stride 4, 16 ch) and Conv-BN-ReLU (stride 8, 32 ch)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, act: nn.Module) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), act)

        self.stem = nn.Sequential(block(3, 8, nn.ReLU6()), block(8, 16, nn.Hardswish()))
        self.down = block(16, 32, nn.ReLU())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        f1 = self.stem(x)
        return OrderedDict([("0", f1), ("1", self.down(f1))])


def tiny_ssd(seed: int = 0) -> SSD:
    """A torchvision SSD with random weights whose scores are peaked (not near-uniform), eval mode."""
    torch.manual_seed(seed)
    anchors = DefaultBoxGenerator([[2], [2, 3]])
    head = SSDHead([16, 32], anchors.num_anchors_per_location(), NUM_CLASSES)
    model = SSD(TinyBackbone(), anchors, (IMAGE_SIZE, IMAGE_SIZE), NUM_CLASSES, head=head, **POSTPROCESS)
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):  # BN statistics that folding must get right
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        for conv in model.head.classification_head.module_list:
            conv.weight.mul_(40.0)  # spread logits: well separated top scores
    return model.eval()


def eager_reference(model: SSD, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torchvision's own pieces, eagerly: normalize -> backbone -> head -> anchors -> reference decode+NMS."""
    with torch.no_grad():
        x = torch.stack([model.transform.normalize(image) for image in images])
        features = list(model.backbone(x).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(x, [(IMAGE_SIZE, IMAGE_SIZE)] * len(x)), features)
    return reference_decode_nms(
        head["bbox_regression"], head["cls_logits"], anchors[0], **decode_attributes(model, IMAGE_SIZE)
    )


def as_tensors(detections: Detections) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(np.asarray(a))
        for a in (detections.num_detections, detections.boxes, detections.scores, detections.labels)
    )


def fresh_images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> SSD:
    return tiny_ssd()


@pytest.fixture(scope="module")
def backend() -> TorchAotiBackend:
    return TorchAotiBackend(AotiOptions(max_autotune=False, gpu_runtime="auto"))


@pytest.fixture(scope="module")
def fp32_engine(model, backend, tmp_path_factory):
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("aoti")
    weights = out / "tiny.safetensors"  # the file build(onnx, ...) would resolve; here given directly
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    source = {"checkpoint": {"path": str(weights), "sha256": sha256_file(weights), "found_via": "test"}}
    spec = BuildSpec(precision="fp32", max_batch=MAX_BATCH)
    return backend.build_from_model(model, spec, out / "fp32", source=source)


@pytest.mark.parametrize("batch,seed", [(3, 1), (1, 2), (MAX_BATCH, 3)])
def test_fp32_engine_matches_eager_head_outputs_with_reference_decode(
    fp32_engine, backend, model, batch, seed
) -> None:
    images = fresh_images(batch, seed)
    got = as_tensors(backend.load(fp32_engine.path).infer(images.numpy()))
    ref = eager_reference(model, images)
    assert (ref[0] > 5).all(), "the test model must produce detections"
    attrs = decode_attributes(model, IMAGE_SIZE)
    problems = _nms_matching().compare_detections(got, ref, attrs, score_tol=1e-4, box_tol=1e-3)
    assert not problems, problems[:5]


def test_fp32_engine_matches_torchvision_postprocess_detections(fp32_engine, backend, model) -> None:
    images = fresh_images(2, seed=7)
    got = backend.load(fp32_engine.path).infer(images)  # torch tensors are accepted as well
    with torch.no_grad():
        eager = model(list(images))  # the full torchvision forward with its own post-processing
    ref = pad_detections(
        [(d["boxes"], d["scores"], d["labels"]) for d in eager], POSTPROCESS["detections_per_img"]
    )
    np.testing.assert_array_equal(got.num_detections, ref[0].numpy())
    problems = _nms_matching().compare_detections(
        as_tensors(got), ref, decode_attributes(model, IMAGE_SIZE), score_tol=1e-4, box_tol=1e-3
    )
    assert not problems, problems[:5]


def test_metadata_records_torch_device_precision_and_hashes(fp32_engine, model) -> None:
    meta = json.loads((fp32_engine.path / "metadata.json").read_text())
    assert meta["backend"] == "torch-aoti" and meta["precision"] == "fp32"
    assert meta["runtime"]["version"] == torch.__version__
    assert meta["device"]["kind"] == "cpu" and meta["device"]["name"]
    assert meta["settings"]["inductor_configs"]["freezing"] is True
    assert meta["settings"]["dynamic_batch"] == [1, MAX_BATCH]
    assert meta["input"]["shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    plugin = meta["plugin"]
    assert plugin["file"] == "plugins/ssdopt_nms_torch.so" and "path" not in plugin  # relative: it moves
    assert plugin["sha256"] == sha256_file(fp32_engine.path / plugin["file"])
    files = [fp32_engine.path / name for name in meta["engine"]["files"]]
    assert meta["engine"]["sha256"] == sha256_files(files)
    assert meta["weights_sha256"] == meta["source"]["weights_sha256"] and len(meta["weights_sha256"]) == 64
    assert meta["checkpoint"]["sha256"] == sha256_file(meta["checkpoint"]["path"])
    assert meta["decode_nms"]["max_detections"] == POSTPROCESS["detections_per_img"]
    assert meta["build_time_s"] > 0 and meta["built_at"]
    np.testing.assert_array_equal(fp32_engine.anchors().shape, (16 * 16 * 4 + 8 * 8 * 6, 4))


def test_layers_are_the_compiled_calls_with_conv_bn_activation_fused(fp32_engine, backend) -> None:
    layers = backend.layers(fp32_engine.path)
    assert [layer.to_dict() for layer in layers] == [layer.to_dict() for layer in fp32_engine.layers()]
    types = [layer.type for layer in layers]
    assert types.count("custom_op:ssdopt::decode_nms") == 1 and types[-1] == "custom_op:ssdopt::decode_nms"
    convs = [layer for layer in layers if "convolution" in layer.type]
    assert len(convs) == 7  # 3 backbone + 4 head convolutions, nothing else left of them
    assert not any("batch_norm" in a for layer in layers for a in layer.attributes.get("original_aten", []))
    fusion = json.loads((fp32_engine.path / "fusion.json").read_text())
    assert fusion["before"]["batchnorm_nodes"] == 3 and fusion["before"]["conv_bn_act_chains"] == 3
    if all(layer.type == "aten:mkldnn._convolution_pointwise" for layer in convs):  # x86 oneDNN build
        assert fusion["chains_fused"] == fusion["before"]["conv_bn_act_chains"]  # every chain of the model
        assert {c.attributes["activation"] for c in convs} == {"hardtanh", "hardswish", "relu", "none"}


def test_wrapper_parser_reads_cpu_and_cuda_calls(tmp_path) -> None:
    """Constructed wrapper code: generated kernels, ATen externs, Triton launches, proxy custom op."""
    code = "\n".join(
        [
            "void AOTInductorModel::run_impl(",
            "    cpp_fused_div_sub_0((const float*)(a.data_ptr()), (at::BFloat16*)(b.data_ptr()));",
            "    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(4, s, t, d, dev, 0, &h));",
            "    // Topologically Sorted Source Nodes: [conv2d, batch_norm, relu_], "
            "Original ATen: [aten.convolution]",
            "    AOTI_TORCH_ERROR_CODE_CHECK(",
            '    aoti_torch_cpu_mkldnn__convolution_pointwise(buf0, w, "relu", x));',
            "    // Topologically Sorted Source Nodes: [add], Original ATen: [aten.add]",
            "    call_triton_poi_fused_add_1(buf1, buf2, 1024, stream, kernels, this->cubin_dir_);",
            "    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_convolution(buf2, w2, nullptr, 1));",
            "    kernels.triton_per_fused_mean_2(buf3, buf4, 16, stream);",
            "    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_proxy_executor_call_function(pe, 0, 5, a));",
            "} // AOTInductorModel::run_impl",
            "    cpp_fused_after_run_impl_9(x);",
        ]
    )
    kernel = 'extern "C" void cpp_fused_div_sub_0(const float* in_ptr0, at::BFloat16* out_ptr0)\n{}\n'
    package = tmp_path / "p.pt2"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("p/data/aotinductor/model/abc.wrapper.cpp", code)
        archive.writestr("p/data/aotinductor/model/k.kernel.cpp", kernel)
        archive.writestr(
            "p/data/aotinductor/model/abc.wrapper.json",
            json.dumps({"nodes": [{"node": {"target": "ssdopt::decode_nms"}}]}),
        )
    layers = layers_from_package(package, "fp16")
    assert [(x.name, x.type) for x in layers] == [
        ("cpp_fused_div_sub_0", "inductor:cpp"),
        ("cpu_mkldnn__convolution_pointwise", "aten:mkldnn._convolution_pointwise"),
        ("triton_poi_fused_add_1", "inductor:triton"),
        ("cuda_convolution", "aten:convolution"),
        ("triton_per_fused_mean_2", "inductor:triton"),
        ("ssdopt::decode_nms", "custom_op:ssdopt::decode_nms"),
    ]
    assert layers[0].precision == "bf16+fp32" and layers[2].precision == "fp16"
    assert layers[1].fused_from == ("conv2d", "batch_norm", "relu_")
    assert layers[1].attributes["activation"] == "relu"
    assert layers[2].fused_from == ("add",) and layers[3].fused_from == ()


def test_load_probe_reports_failures_and_signals_without_crashing(tmp_path, monkeypatch) -> None:
    from ssdopt.backends import aoti_package

    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a package")
    result = aoti_package.probe_aoti_load(broken, IMAGE_SIZE, device="cpu", load_op=False, timeout_s=120)
    assert result["ok"] is False and result["returncode"] == 1 and result["signal"] is None
    assert result["last_stage"] == "aoti_load_package" and result["stderr_tail"]

    def segfault(command, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return subprocess.CompletedProcess(command, -11, "SSDOPT_STAGE run\n", "Fatal Python error")

    monkeypatch.setattr(aoti_package.subprocess, "run", segfault)
    result = aoti_package.probe_aoti_load(broken, IMAGE_SIZE, device="cuda")
    assert (result["ok"], result["signal"], result["last_stage"]) == (False, "SIGSEGV", "run")


def test_moved_engine_loads_its_own_op_library_in_a_fresh_process(fp32_engine, backend, tmp_path) -> None:
    """The engine copied elsewhere, the plugin build cache empty: the op comes from plugins/ beside it."""
    images = fresh_images(2, seed=11)
    want = backend.load(fp32_engine.path).infer(images)
    moved = tmp_path / "another" / "place" / "engine"
    shutil.copytree(fp32_engine.path, moved)
    (tmp_path / "empty-cache").mkdir()
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys\nimport numpy as np\nfrom ssdopt import plugin_build\n"
        "def no_build(*a, **k):\n    raise SystemExit('loading tried to build the op library')\n"
        "plugin_build.build_torch_ops = plugin_build.build_native = no_build\n"
        "from ssdopt.backends.torch_aoti import TorchAotiBackend\n"
        "got = TorchAotiBackend().load(sys.argv[1]).infer(np.load(sys.argv[2]))\n"
        "np.savez(sys.argv[3], boxes=got.boxes, scores=got.scores, labels=got.labels,\n"
        "         num=got.num_detections)\n"
    )
    env = {**os.environ, "SSDOPT_BUILD_DIR": str(tmp_path / "empty-cache")}
    run = subprocess.run(
        [sys.executable, "-c", script, str(moved), str(tmp_path / "images.npy"), str(tmp_path / "got.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert list((tmp_path / "empty-cache").iterdir()) == []
    got = np.load(tmp_path / "got.npz")
    np.testing.assert_array_equal(got["num"], want.num_detections)
    np.testing.assert_array_equal(got["labels"], want.labels)
    np.testing.assert_allclose(got["boxes"], want.boxes, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["scores"], want.scores, rtol=0, atol=1e-6)


def test_tampered_op_library_copy_is_refused(fp32_engine, backend, tmp_path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(fp32_engine.path, copy)
    library = copy / "plugins" / "ssdopt_nms_torch.so"
    library.write_bytes(library.read_bytes() + b"\0")
    with pytest.raises(SsdoptError, match="changed after the build") as info:
        backend.load(copy)
    assert info.value.what == str(library) and "ssdopt build" in info.value.fix


def test_tampered_engine_files_are_refused(fp32_engine, backend, tmp_path) -> None:
    for name in ("engine.pt2", "program.pt2"):
        copy = tmp_path / name.replace(".", "-")
        shutil.copytree(fp32_engine.path, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(SsdoptError, match="sha256"):
            backend.load(copy)


def test_other_torch_version_is_refused(fp32_engine, backend, tmp_path) -> None:
    copy = tmp_path / "old-torch"
    shutil.copytree(fp32_engine.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["runtime"]["version"] = "2.0.0"
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(SsdoptError, match="2.0.0"):
        backend.load(copy)


def test_batch_beyond_max_and_wrong_size_are_refused(fp32_engine, backend) -> None:
    runner = backend.load(fp32_engine.path)
    with pytest.raises(SsdoptError, match=f"1..{MAX_BATCH}"):
        runner.infer(fresh_images(MAX_BATCH + 1, 0))
    with pytest.raises(SsdoptError, match="resize"):
        runner.infer(torch.rand(1, 3, IMAGE_SIZE + 8, IMAGE_SIZE))


def test_int8_is_refused_with_the_reason(backend) -> None:
    with pytest.raises(SsdoptError, match="Q/DQ"):
        backend.available("cpu").require("torch-aoti", "int8")


def test_checkpoint_is_found_beside_the_onnx_and_checked(tmp_path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    onnx = export / "model.onnx"
    onnx.write_bytes(b"graph")
    digest = sha256_file(checkpoint)

    (export / "export.json").write_text(json.dumps({"checkpoint": "../model.safetensors"}))
    found = resolve_checkpoint(onnx)
    assert Path(found["path"]).resolve() == checkpoint.resolve() and found["sha256"] == digest
    assert found["found_via"].endswith("export.json")

    (export / "export.json").write_text(
        json.dumps({"checkpoint": {"path": str(checkpoint), "sha256": "0" * 64}})
    )
    with pytest.raises(SsdoptError, match="changed after the export"):
        resolve_checkpoint(onnx)
    # provenance and a .safetensors argument come first
    assert resolve_checkpoint(onnx, {"checkpoint": str(checkpoint)})["found_via"] == "provenance"
    assert resolve_checkpoint(checkpoint)["found_via"] == "argument"

    (export / "export.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(SsdoptError, match="checkpoint"):
        resolve_checkpoint(onnx)


def test_build_loads_the_checkpoint_named_by_export_json(tmp_path, monkeypatch) -> None:
    """build(onnx, ...) -> the checkpoint beside it, rebuilt by the zoo; compiling is stubbed out here."""
    from ssdopt.models.zoo import build_model, save_checkpoint

    checkpoint = save_checkpoint(
        build_model("ssdlite320_mobilenet_v3_large", 3),
        tmp_path / "ckpt.safetensors",
        {"model": "ssdlite320_mobilenet_v3_large", "num_classes": 3, "class_names": ["bg", "a", "b"]},
    )
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph")
    (tmp_path / "export.json").write_text(json.dumps({"checkpoint": checkpoint.name}))
    seen = {}

    def fake_build_from_model(model, spec, out, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.update(model=model, **kwargs)
        return "engine"

    backend = TorchAotiBackend(AotiOptions())
    monkeypatch.setattr(backend, "build_from_model", fake_build_from_model)
    assert backend.build(onnx, BuildSpec(), tmp_path / "out") == "engine"
    assert seen["source"]["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert seen["source"]["checkpoint_meta"]["image_size"] == 320
    assert seen["source"]["source_onnx"]["sha256"] == sha256_file(onnx)
    assert seen["model"].head.classification_head.num_columns == 3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_engines_keep_the_top_detections(model, backend, tmp_path, precision) -> None:
    """bf16/fp16 backbone+head on the CPU (decode stays fp32): each image's 5 best reference
    detections are found with the same label, IoU > 0.9 and a score within 0.03."""
    engine = backend.build_from_model(
        model, BuildSpec(precision=precision, max_batch=2), tmp_path / precision
    )
    assert engine.metadata["settings"]["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    convs = [layer for layer in engine.layers() if "convolution" in layer.type]
    assert convs and {layer.precision for layer in convs} == {precision}
    images = fresh_images(2, seed=11)
    got = backend.load(engine.path).infer(images)
    num, boxes, scores, labels = eager_reference(model, images)
    for b in range(2):
        n = int(got.num_detections[b])
        overlap = torchvision.ops.box_iou(boxes[b, :5], torch.from_numpy(got.boxes[b, :n]))
        for i in range(5):
            same = (torch.from_numpy(got.labels[b, :n]) == labels[b, i]) & (overlap[i] > 0.9)
            close = same & (torch.from_numpy(got.scores[b, :n]) - scores[b, i]).abs().lt(0.03)
            assert close.any(), f"{precision}: reference detection {i} of image {b} not found"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")
@pytest.mark.parametrize("runtime", ["aoti", "compile"])
def test_cuda_engine_replays_a_cuda_graph_and_matches(model, tmp_path, runtime) -> None:
    backend = TorchAotiBackend(AotiOptions(gpu_runtime=runtime))
    engine = backend.build_from_model(
        model, BuildSpec(precision="fp32", device="cuda", max_batch=2), tmp_path / "e"
    )
    assert engine.metadata["settings"]["gpu_runtime"] == runtime
    runner = backend.load(engine.path)
    images = fresh_images(2, seed=5)
    got = as_tensors(runner.infer(images))
    assert runner.cuda_graphs and 2 in runner._graphs and not runner.graph_errors
    problems = _nms_matching().compare_detections(
        got,
        eager_reference(model, images),
        decode_attributes(model, IMAGE_SIZE),
        score_tol=1e-3,
        box_tol=1e-2,
    )
    assert not problems, problems[:5]


def test_large_batch_recipe_runs_its_own_compile_from_its_batch(fp32_engine, monkeypatch) -> None:
    """compile_program with a recorded large-batch recipe: batches below from_batch run the engine's own
    compile, the others a second compile with the recipe's configs and cudnn.benchmark on for the call
    only; both give the program's detections. torch.compile is recorded, not run (the GPU path)."""
    from ssdopt.backends.aoti_detector import LARGE_BATCH_CONFIGS, compile_program

    compiled, calls = [], []

    def record(module, **kwargs):  # noqa: ANN001, ANN003, ANN202
        compiled.append(kwargs["options"])
        index = len(compiled) - 1

        def run(images):  # noqa: ANN001, ANN202
            calls.append((index, int(images.shape[0]), torch.backends.cudnn.benchmark))
            return module(images)

        return run

    monkeypatch.setattr(torch, "compile", record)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    recipe = {"from_batch": 2, "inductor_configs": LARGE_BATCH_CONFIGS, "cudnn_benchmark": True}
    forward = compile_program(fp32_engine.path / "program.pt2", large_batch=recipe)
    assert len(compiled) == 2 and "conv_1x1_as_mm" not in compiled[0]
    assert compiled[1] == {**compiled[0], **LARGE_BATCH_CONFIGS}
    one, two = fresh_images(1, seed=8), fresh_images(2, seed=9)
    small, large = forward(one), forward(two)
    assert calls == [(0, 1, False), (1, 2, True)] and torch.backends.cudnn.benchmark is False
    runner = TorchAotiBackend(AotiOptions(gpu_runtime="aoti")).load(fp32_engine.path)
    for images, got in ((one, small), (two, large)):
        want = as_tensors(runner.infer(images))
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-4)
    compile_program(fp32_engine.path / "program.pt2", large_batch=None)
    assert len(compiled) == 3  # no recipe: one compile


def test_large_batch_option_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SSDOPT_AOTI_LARGE_BATCH_FROM", "0")
    assert AotiOptions.from_env().large_batch_from == 0
    monkeypatch.delenv("SSDOPT_AOTI_LARGE_BATCH_FROM")
    assert AotiOptions.from_env().large_batch_from == AotiOptions.large_batch_from > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")
def test_cuda_large_batch_recipe_is_recorded_and_matches(model, tmp_path) -> None:
    backend = TorchAotiBackend(AotiOptions(gpu_runtime="compile", large_batch_from=2))
    engine = backend.build_from_model(
        model, BuildSpec(precision="fp32", device="cuda", max_batch=3), tmp_path / "e"
    )
    assert engine.metadata["settings"]["large_batch_recipe"]["from_batch"] == 2
    runner = backend.load(engine.path)
    for batch in (1, 3):
        images = fresh_images(batch, seed=10 + batch)
        problems = _nms_matching().compare_detections(
            as_tensors(runner.infer(images)),
            eager_reference(model, images),
            decode_attributes(model, IMAGE_SIZE),
            score_tol=1e-3,
            box_tol=1e-2,
        )
        assert not problems, problems[:5]
