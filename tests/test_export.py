"""ONNX export of the reference model: files, checks, ORT CPU parity, anchors, detections, atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import ssdopt.export as export_module
from ssdopt.errors import SsdoptError
from ssdopt.export import export_checkpoint, export_onnx
from ssdopt.models.zoo import build_model, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "data" / "reference" / "ssdlite320_shapes.safetensors"
SIZE = 320


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The committed reference checkpoint exported once for the whole module."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_checkpoint(REFERENCE, out)
    model, _ = load_checkpoint(REFERENCE)
    return out, model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """4 synthetic-dataset images [4, 3, 320, 320] in [0, 1] (real content: meaningful detections)."""
    from ssdopt.data.synthetic import generate_image, image_rng

    arrays = [generate_image(image_rng(123, "test-export", i), SIZE)[0] for i in range(4)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_directory_contents_and_metadata(exported):
    out, model = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "anchors.npy",
        "export.json",
        "model.onnx",
        "model_nms.onnx",
        "model_unfolded.onnx",
    ]
    info = json.loads((out / "export.json").read_text())
    assert info["model"] == "ssdlite320_mobilenet_v3_large" and info["num_classes"] == 11
    assert info["class_names"][0] == "__background__" and len(info["class_names"]) == 11
    assert info["num_anchors"] == 3234 and info["image_size"] == SIZE and info["opset"] >= 18
    assert info["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "folded_into_graph": True}
    assert info["postprocess"]["pre_nms_top_k"] == 400 and info["postprocess"]["iou_threshold"] == 0.45
    for name, digest in info["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert info["parity"] == {
        "reference": "torch CPU",
        "runtime": "onnxruntime CPU",
        "tolerance": 1e-4,
        "within_tolerance": ["model", "unfolded"],
    }


def test_onnx_files_are_single_checked_opset18_with_dynamic_batch(exported):
    out, _ = exported
    for name in ("model.onnx", "model_unfolded.onnx"):
        proto = onnx.load(str(out / name), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= 18
        assert [i.name for i in proto.graph.input] == ["images"]
        assert [o.name for o in proto.graph.output] == ["box_deltas", "class_logits"]
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def test_onnx_files_name_no_path_of_this_checkout(exported):
    """The exporter writes each node's Python stack trace (absolute paths) into the file; kept, the same
    checkpoint exported from two clones differs byte for byte and `dvc repro` rewrites dvc.lock."""
    out, _ = exported
    for name in ("model.onnx", "model_unfolded.onnx", "model_nms.onnx"):
        data = (out / name).read_bytes()
        assert str(REPO).encode() not in data, name
        assert b"stack_trace" not in data, name


def test_batchnorm_folded_in_one_file_kept_in_the_other(exported):
    out, model = exported
    counts = {}
    for name in ("model.onnx", "model_unfolded.onnx"):
        nodes = onnx.load(str(out / name)).graph.node
        counts[name] = (
            sum(n.op_type == "BatchNormalization" for n in nodes),
            sum(n.op_type == "Conv" for n in nodes),
        )
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert counts["model.onnx"][0] == 0
    assert counts["model_unfolded.onnx"][0] == num_bn == 70
    assert counts["model.onnx"][1] == counts["model_unfolded.onnx"][1]


def _torchvision_head(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """box deltas, logits and anchors the way torchvision's SSD.forward computes them (its own transform)."""
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        features = list(model.backbone(image_list.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(image_list, features)
    return head["bbox_regression"], head["cls_logits"], anchors


@pytest.mark.parametrize("batch", [1, 4])
def test_ort_cpu_parity_with_torchvision(exported, images, batch):
    out, model = exported
    deltas, logits, _ = _torchvision_head(model, images[:batch])
    noise = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    n_deltas, n_logits, _ = _torchvision_head(model, noise)
    for name in ("model.onnx", "model_unfolded.onnx"):
        session = _session(out / name)
        for x, d, c in ((images[:batch], deltas, logits), (noise, n_deltas, n_logits)):
            got_d, got_c = session.run(None, {"images": x.numpy()})
            assert got_d.shape == (batch, 3234, 4) and got_c.shape == (batch, 3234, 11)
            assert np.abs(got_d - d.numpy()).max() <= 1e-4, name
            assert np.abs(got_c - c.numpy()).max() <= 1e-4, name


def test_anchors_equal_torchvision_anchors(exported, images):
    out, model = exported
    _, _, anchors = _torchvision_head(model, images[:2])
    saved = np.load(out / "anchors.npy")
    assert saved.dtype == np.float32 and saved.shape == (3234, 4)
    for a in anchors:
        np.testing.assert_array_equal(saved, a.numpy())


def test_torchvision_postprocess_on_onnx_outputs_reproduces_eager_detections(exported, images):
    out, model = exported
    deltas, logits = _session(out / "model.onnx").run(None, {"images": images.numpy()})
    anchors = torch.from_numpy(np.load(out / "anchors.npy"))
    head = {"bbox_regression": torch.from_numpy(deltas), "cls_logits": torch.from_numpy(logits)}
    with torch.no_grad():
        from_onnx = model.postprocess_detections(head, [anchors] * len(images), [(SIZE, SIZE)] * len(images))
        eager = model(list(images))
    total = 0
    for e, o in zip(eager, from_onnx, strict=True):
        assert e["boxes"].shape[0] > 0
        total += _matched(e, o)
    assert total >= 8  # the trained model finds objects (13 here): the comparison is not vacuous


def _matched(eager: dict[str, torch.Tensor], onnx_det: dict[str, torch.Tensor]) -> int:
    """Every eager detection has an ONNX-derived twin (same label, score within 1e-4, box within 1e-2 px),
    except where a score sits within 1e-4 of the 0.01 threshold. Returns the number matched above 0.5."""
    confident = 0
    for box, score, label in zip(eager["boxes"], eager["scores"], eager["labels"], strict=True):
        same = (onnx_det["labels"] == label) & ((onnx_det["scores"] - score).abs() <= 1e-4)
        ok = bool(same.any()) and bool(
            ((onnx_det["boxes"][same] - box).abs().max(dim=1).values <= 1e-2).any()
        )
        assert ok or abs(float(score) - 0.01) <= 1e-4, (box, score, label)
        confident += int(score > 0.5)
    assert abs(len(eager["boxes"]) - len(onnx_det["boxes"])) <= 2
    return confident


def test_failed_parity_leaves_nothing(exported, tmp_path, monkeypatch):
    source, _ = exported

    def copy_export(wrapper, example, folded, unfolded, opset):  # skip the slow exporter: reuse the files
        shutil.copy(source / folded.name, folded)
        shutil.copy(source / unfolded.name, unfolded)

    monkeypatch.setattr(export_module, "_export_both", copy_export)
    monkeypatch.setattr(export_module, "ort_max_abs_diff", lambda *a, **k: 0.5)
    out = tmp_path / "onnx"
    with pytest.raises(SsdoptError, match="0.5"):
        export_onnx(build_model("ssdlite320_mobilenet_v3_large", 11), out)
    assert list(tmp_path.iterdir()) == []


def test_export_json_is_the_same_whatever_parity_this_cpu_measured(exported, tmp_path, monkeypatch):
    """export.json is a DVC output: a CPU whose kernels round differently (AVX2 vs AVX-512) passes the
    same check with another max abs difference, and must still write the same bytes (else dvc.lock
    changes after a fresh clone's `make run`)."""
    source, _ = exported

    def copy_export(wrapper, example, folded, unfolded, opset):  # skip the slow exporter: reuse the files
        shutil.copy(source / folded.name, folded)
        shutil.copy(source / unfolded.name, unfolded)

    monkeypatch.setattr(export_module, "_export_both", copy_export)
    model = build_model("ssdlite320_mobilenet_v3_large", 11)
    texts = []
    for i, diff in enumerate((1.0013580322265625e-05, 6.67572021484375e-06)):
        monkeypatch.setattr(export_module, "ort_max_abs_diff", lambda *a, d=diff, **k: d)
        texts.append((export_onnx(model, tmp_path / f"onnx{i}") / "export.json").read_text())
    assert texts[0] == texts[1]


def test_bad_requests_leave_nothing(tmp_path):
    model = build_model("ssdlite320_mobilenet_v3_large", 3)
    with pytest.raises(SsdoptError, match="opset"):
        export_onnx(model, tmp_path / "a", opset=17)
    with pytest.raises(SsdoptError, match="missing.safetensors"):
        export_checkpoint(tmp_path / "missing.safetensors", tmp_path / "b")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SsdoptError, match="empty"):
        export_onnx(model, precious)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    assert (precious / "notes.txt").read_text() == "keep me"


def test_nms_variant_runs_the_fused_op_like_the_reference(exported, images):
    """model_nms.onnx = model.onnx + SSDDecodeNMS; through ONNX Runtime it equals the reference decode."""
    from ssdopt.ops import reference_decode_nms
    from ssdopt.ops.onnx_node import find_decode_nms_node
    from ssdopt.ops.ort import run_checked, session_from_onnx

    out, _ = exported
    graph = onnx.load(str(out / "model_nms.onnx"))
    node = find_decode_nms_node(graph)
    assert node.domain == "ssdopt" and [o.name for o in graph.graph.output] == [
        "num_detections",
        "boxes",
        "scores",
        "labels",
    ]
    batch = images.numpy()
    deltas, logits = _session(out / "model.onnx").run(["box_deltas", "class_logits"], {"images": batch})
    ref = reference_decode_nms(
        torch.from_numpy(deltas),
        torch.from_numpy(logits),
        torch.from_numpy(np.load(out / "anchors.npy")),
        image_height=SIZE,
        image_width=SIZE,
    )
    got = run_checked(session_from_onnx(graph), {"images": batch})
    np.testing.assert_array_equal(got[0], ref[0].numpy())
    for i, n in enumerate(ref[0].tolist()):
        assert n > 0
        np.testing.assert_allclose(np.sort(got[2][i, :n]), np.sort(ref[2][i, :n].numpy()), atol=1e-5)
