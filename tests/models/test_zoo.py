"""Model zoo: builders by name, safetensors checkpoints (no pickle) and every bad checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssdopt.errors import SsdoptError
from ssdopt.models.zoo import (
    POSTPROCESS_DEFAULTS,
    anchors_for,
    build_model,
    known_models,
    load_checkpoint,
    model_image_size,
    num_classes_of,
    read_checkpoint_meta,
    save_checkpoint,
)

NAME = "ssdlite320_mobilenet_v3_large"
CLASSES = ["__background__", "a", "b", "c"]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(NAME, num_classes=len(CLASSES)).eval()


@pytest.fixture()
def checkpoint(tmp_path: Path, small_model) -> Path:
    return save_checkpoint(
        small_model, tmp_path / "m.safetensors", {"model": NAME, "num_classes": 4, "class_names": CLASSES}
    )


def test_known_models_are_the_torchvision_ssd_builders():
    assert known_models() == ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large"]


def test_build_ssdlite_has_design_postprocess_defaults(small_model):
    assert num_classes_of(small_model) == 4
    assert model_image_size(small_model) == 320
    for key, value in POSTPROCESS_DEFAULTS.items():
        assert getattr(small_model, key) == value
    assert anchors_for(small_model, 320).shape == (3234, 4)


def test_build_ssd300_vgg16_random_weights():
    model = build_model("ssd300_vgg16", num_classes=3, nms_thresh=0.5)
    assert num_classes_of(model) == 3 and model_image_size(model) == 300
    assert model.nms_thresh == 0.5 and model.topk_candidates == 400
    assert anchors_for(model, 300).shape == (8732, 4)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(SsdoptError) as err:
        build_model("yolo_v99", num_classes=3)
    assert "yolo_v99" in str(err.value) and "ssd300_vgg16" in str(err.value) and NAME in str(err.value)


@pytest.mark.parametrize("bad", [1, 0, 2.5])
def test_bad_class_count(bad):
    with pytest.raises(SsdoptError, match="num_classes"):
        build_model(NAME, num_classes=bad)


def test_round_trip_without_pickle(checkpoint: Path, small_model):
    raw = checkpoint.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])  # a safetensors file: length + JSON header + raw tensors
    meta = json.loads(header["__metadata__"]["ssdopt"])
    assert meta["model"] == NAME and meta["num_classes"] == 4 and meta["image_size"] == 320
    model, loaded_meta = load_checkpoint(checkpoint)
    assert loaded_meta == meta == read_checkpoint_meta(checkpoint)
    for key, value in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = [torch.rand(3, 320, 320)]
    with torch.no_grad():
        a, b = small_model(x)[0], model(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert list(checkpoint.parent.iterdir()) == [checkpoint]  # no temp file left


def test_build_model_from_checkpoint(checkpoint: Path):
    model = build_model(NAME, 4, checkpoint=checkpoint, score_thresh=0.2)
    assert model.score_thresh == 0.2 and num_classes_of(model) == 4
    with pytest.raises(SsdoptError, match="ssd300_vgg16"):
        build_model("ssd300_vgg16", 4, checkpoint=checkpoint)


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(SsdoptError) as err:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(err.value) and "ssdopt train" in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle"])
def test_corrupt_checkpoint(tmp_path: Path, checkpoint: Path, damage: str):
    bad = tmp_path / "bad.safetensors"
    if damage == "garbage":
        bad.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    else:  # a torch.save pickle renamed: must be refused, never unpickled
        torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(SsdoptError) as err:
        load_checkpoint(bad)
    assert "bad.safetensors" in str(err.value)


def test_wrong_number_of_classes(checkpoint: Path):
    with pytest.raises(SsdoptError) as err:
        load_checkpoint(checkpoint, expected_num_classes=11)
    assert "11 classes" in str(err.value) and "checkpoint has 4 classes" in str(err.value)


def test_weights_of_another_class_count_than_the_metadata(tmp_path: Path):
    model = build_model(NAME, num_classes=6)
    path = tmp_path / "lying.safetensors"
    save_checkpoint(model, path, {"model": NAME, "num_classes": 4, "class_names": CLASSES})
    with pytest.raises(SsdoptError) as err:
        load_checkpoint(path)
    assert "have 6" in str(err.value) and "4 classes" in str(err.value)


def test_unknown_model_name_in_checkpoint(tmp_path: Path, checkpoint: Path):
    tensors = load_file(str(checkpoint))
    path = tmp_path / "renamed.safetensors"
    meta = {"model": "ssd9000", "num_classes": 4, "class_names": CLASSES}
    save_file(tensors, str(path), metadata={"ssdopt": json.dumps(meta)})
    with pytest.raises(SsdoptError) as err:
        load_checkpoint(path)
    assert "ssd9000" in str(err.value) and NAME in str(err.value)


def test_checkpoint_without_ssdopt_metadata_is_a_users_state_dict(
    tmp_path: Path, checkpoint: Path, small_model
):
    """Plain safetensors: recognised from its tensors (tests/models/test_foreign.py has the rest)."""
    path = tmp_path / "plain.safetensors"
    save_file(load_file(str(checkpoint)), str(path))
    model, meta = load_checkpoint(path, class_names=CLASSES[1:])
    assert (meta["model"], meta["num_classes"], meta["class_names"]) == (NAME, 4, CLASSES)
    images = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        want = small_model.head(list(small_model.backbone(images).values()))
        got = model.head(list(model.backbone(images).values()))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_nan_weights_are_refused_on_load_and_on_save(tmp_path: Path, checkpoint: Path, small_model):
    tensors = load_file(str(checkpoint))
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    meta = {"model": NAME, "num_classes": 4, "class_names": CLASSES}
    save_file(tensors, str(path), metadata={"ssdopt": json.dumps(meta)})
    with pytest.raises(SsdoptError, match="NaN"):
        load_checkpoint(path)

    broken = build_model(NAME, num_classes=4)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("inf"))
    out = tmp_path / "sub" / "inf.safetensors"
    with pytest.raises(SsdoptError, match="NaN/Inf"):
        save_checkpoint(broken, out, meta)
    assert not out.parent.exists()  # nothing written, not even the folder


def test_save_requires_metadata(tmp_path: Path, small_model):
    with pytest.raises(SsdoptError, match="class_names"):
        save_checkpoint(small_model, tmp_path / "x.safetensors", {"model": NAME, "num_classes": 4})
    assert not (tmp_path / "x.safetensors").exists()
