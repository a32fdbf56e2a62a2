"""README "Deploy your own SSD", command by command: a torchvision state dict (.pth) and a COCO folder
of one's own (annotations/instances_*.json + images/, category ids 3, 7, 12, 20, JPEG and PNG of
several sizes) to a promoted champion and `ssdopt detect` on a folder of photos. Random-weight
torchvision models of 5 and 91 classes, the 91-class one in torchvision's COCO (full-tail) layout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torchvision.models import detection

SSDOPT = Path(sys.executable).with_name("ssdopt")
MODEL = "ssdlite320_mobilenet_v3_large"


def coco_folder(root: Path, category_ids: list[int]) -> Path:
    """root/annotations/instances_{train,val}.json + root/images/{train,val}/ from the synthetic
    generator: the first shape classes renamed to `category_ids`; half the val images as 400x300 PNG."""
    from ssdopt.data.synthetic import generate_dataset

    generated = generate_dataset(
        root.parent / f"{root.name}-gen",
        seed=11,
        image_size=96,
        splits={"train": 16, "val": 8},
        workers=1,
        progress=False,
    )
    for split in ("train", "val"):
        data = json.loads((generated / f"{split}.json").read_text())
        shapes = sorted(data["categories"], key=lambda c: c["id"])
        renamed = {c["id"]: new for c, new in zip(shapes, category_ids, strict=False)}
        names = {c["id"]: c["name"] for c in shapes}
        categories = [{"id": new, "name": names.get(old, f"thing_{new}")} for old, new in renamed.items()]
        categories += [{"id": i, "name": f"thing_{i}"} for i in category_ids[len(shapes) :]]
        annotations = [
            {**a, "category_id": renamed[a["category_id"]]}
            for a in data["annotations"]
            if a["category_id"] in renamed
        ]
        out = root / "images" / split
        out.mkdir(parents=True, exist_ok=True)
        images = []
        for index, image in enumerate(data["images"]):
            pixels = Image.open(generated / split / image["file_name"])
            if split == "val" and index % 2:  # another size and format: boxes scale with it
                sx, sy = 400 / image["width"], 300 / image["height"]
                name = Path(image["file_name"]).with_suffix(".png").name
                pixels.resize((400, 300)).save(out / name)
                for a in annotations:
                    if a["image_id"] == image["id"]:
                        x, y, w, h = a["bbox"]
                        a["bbox"] = [x * sx, y * sy, w * sx, h * sy]
                        a["area"] = w * sx * h * sy
                images.append({**image, "file_name": name, "width": 400, "height": 300})
            else:
                pixels.save(out / image["file_name"])
                images.append(image)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def torchvision_pth(path: Path, num_classes: int, full_tail: bool) -> Path:
    from ssdopt.models.foreign import _full_tail

    torch.manual_seed(num_classes)
    with _full_tail() if full_tail else contextlib.nullcontext():
        model = getattr(detection, MODEL)(weights=None, weights_backbone=None, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return path


def ssdopt(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([str(SSDOPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"ssdopt {' '.join(args)}\n{done.stdout}\n{done.stderr[-3000:]}"
    print(f"$ ssdopt {' '.join(args)}\n{done.stdout}")
    return done.stdout


@pytest.mark.parametrize(
    ("num_classes", "category_ids", "full_tail", "precisions"),
    [(5, [3, 7, 12, 20], False, ("fp32", "int8")), (91, list(range(1, 91)), True, ("fp32",))],
    ids=["5-classes", "91-classes-coco-layout"],
)
def test_deploy_your_own_ssd(
    tmp_path: Path, num_classes: int, category_ids: list[int], full_tail: bool, precisions: tuple[str, ...]
) -> None:
    """Every README command for 5 classes; for torchvision's 91-class COCO layout the same commands but
    the int8 build (the layout matters to the import, the export, the class names and detection ids; int8
    of the same graph adds CI time, not coverage)."""
    work = tmp_path / "project"
    work.mkdir()
    params = {
        "optimize": {"model_name": "my-ssd", "mlflow_root": "mlflow", "experiment": "my-ssd"},
        "bench": {"timing": {"warmup_s": 0.05, "min_duration_s": 0.3, "min_iterations": 10}},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    coco = coco_folder(work / "coco", category_ids)
    torchvision_pth(work / "my_ssd.pth", num_classes, full_tail)

    dvc = [str(Path(sys.executable).with_name("dvc")), "-q"]
    subprocess.run([*dvc, "init", "--no-scm"], cwd=work, check=True, timeout=120)
    subprocess.run([*dvc, "add", "coco"], cwd=work, check=True, timeout=120)  # the data's version
    out = ssdopt(work, "export", "--checkpoint", "my_ssd.pth", "--dataset", "coco", "--out", "onnx")
    assert "exported to onnx" in out
    exported = json.loads((work / "onnx" / "export.json").read_text())
    assert exported["num_classes"] == num_classes and exported["model"] == MODEL
    assert exported["class_names"][1:] == [
        c["name"]
        for c in sorted(
            json.loads((coco / "annotations" / "instances_val.json").read_text())["categories"],
            key=lambda c: c["id"],
        )
    ]

    ssdopt(
        work,
        "data",
        "calibration",
        "--dataset",
        "coco",
        "--out",
        "calibration",
        "--num-images",
        "8",
        "--strategy",
        "random",
    )
    subprocess.run([*dvc, "add", "calibration"], cwd=work, check=True, timeout=120)  # its version too
    engines = {}
    for precision in precisions:
        out = ssdopt(
            work,
            "build",
            "--backend",
            "onnxruntime",
            "--precision",
            precision,
            "--onnx",
            "onnx/model_nms.onnx",
            "--calibration",
            "calibration",
            "--out",
            "engines",
        )
        engines[precision] = re.search(r"engine: (\S+)", out).group(1)
    for precision, engine in engines.items():
        ssdopt(
            work,
            "evaluate",
            engine,
            "--dataset",
            "coco",
            "--reference",
            engines["fp32"],
            "--out",
            f"eval-{precision}.json",
        )
    logged = [ssdopt(work, "track", "log", engines[p], "--evaluation", f"eval-{p}.json") for p in engines]
    dvc_md5 = yaml.safe_load((work / "coco.dvc").read_text())["outs"][0]["md5"]
    assert json.loads((work / f"eval-{precisions[-1]}.json").read_text())["dataset_md5"] == dvc_md5
    from ssdopt.backends.device import deployment_target

    registered = f"my-ssd.{deployment_target('cpu')}"
    assert f"{registered}: champion v" in logged[-1]

    # detections in the dataset's own category ids
    import mlflow

    from ssdopt.data.coco import load_split
    from ssdopt.evaluate.engine import evaluate_engine

    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)  # registry too: an earlier test may have set a global one
    runs = [client.get_run(v.run_id) for v in client.search_model_versions(f"name='{registered}'")]
    assert {r.data.params["dataset_md5"] for r in runs} == {dvc_md5}
    if "int8" in precisions:
        int8 = next(r for r in runs if r.data.params["precision"] == "int8")
        calibration_md5 = yaml.safe_load((work / "calibration.dvc").read_text())["outs"][0]["md5"]
        assert int8.data.params["calibration_md5"] == calibration_md5

    result = evaluate_engine(Path(work / engines["fp32"]), load_split(coco, "val"))
    assert {d["category_id"] for d in result.detections} <= set(category_ids)

    out = ssdopt(
        work,
        "detect",
        "--engine",
        f"models:/{registered}@champion",
        "coco/images/val",
        "--out",
        "detections",
        "--batch-size",
        "4",
        "--min-score",
        "0.0",
    )
    records = sorted((work / "detections").glob("*.json"))
    assert len(records) == 8 and len(list((work / "detections").glob("*.png"))) == 8
    names = set(exported["class_names"][1:])
    for record in records:
        data = json.loads(record.read_text())
        assert {d["class_name"] for d in data["detections"]} <= names
        if data["width"] == 400:  # boxes in the photo's own pixels
            assert all(d["box_xyxy"][2] <= 400.01 and d["box_xyxy"][3] <= 300.01 for d in data["detections"])
