"""Issue 3, item 6: on the reference model's val split, the fused op's detections give the same
pycocotools mAP as the torchvision reference post-processing.

One pass of the exported network (ONNX Runtime CPU, head outputs) over the split; the same head
outputs are decoded twice, by `ssdopt.ops.decode_nms` (the C++ kernel) and by
`ssdopt.ops.reference_decode_nms` (torchvision), and both are scored by pycocotools.

    python benchmarks/nms_map_check.py --out benchmarks/results/nms_map_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ssdopt.data.coco import load_coco
from ssdopt.data.images import read_image
from ssdopt.evaluate.accuracy import coco_evaluate, detections_to_coco, label_to_category
from ssdopt.ops import decode_nms, reference_decode_nms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--export", type=Path, default=Path("artifacts/onnx"))
    parser.add_argument("--dataset", type=Path, default=Path("data/synthetic/val.json"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nms_map_check.json"))
    args = parser.parse_args()

    info = json.loads((args.export / "export.json").read_text())
    post, size = info["postprocess"], int(info["image_size"])
    attrs = dict(
        score_threshold=post["score_threshold"],
        iou_threshold=post["iou_threshold"],
        pre_nms_top_k=post["pre_nms_top_k"],
        max_detections=post["max_detections"],
        box_weights=tuple(info["box_coder_weights"]),
        image_height=size,
        image_width=size,
    )
    anchors = torch.from_numpy(np.load(args.export / "anchors.npy"))
    session = ort.InferenceSession(str(args.export / "model.onnx"), providers=["CPUExecutionProvider"])
    ds = load_coco(args.dataset)
    label_map = label_to_category(ds)
    found: dict[str, list] = {"op": [], "reference": []}
    seconds = {"op": 0.0, "reference": 0.0}
    differing_images = 0
    for start in range(0, len(ds.images), args.batch):
        chunk = ds.images[start : start + args.batch]
        batch = np.stack([read_image(ds.image_path(im), size=size) for im in chunk])
        deltas, logits = (
            torch.from_numpy(a) for a in session.run(["box_deltas", "class_logits"], {"images": batch})
        )
        outs = {}
        for name, fn in (("op", decode_nms), ("reference", reference_decode_nms)):
            t0 = time.perf_counter()
            outs[name] = fn(deltas, logits, anchors, **attrs)
            seconds[name] += time.perf_counter() - t0
        for i, im in enumerate(chunk):
            sx, sy = im.width / size, im.height / size
            scale = torch.tensor([sx, sy, sx, sy])
            for name, (num, boxes, scores, labels) in outs.items():
                n = int(num[i])
                found[name] += detections_to_coco(
                    im.id, boxes[i, :n] * scale, scores[i, :n], labels[i, :n], label_map
                )
            if int(outs["op"][0][i]) != int(outs["reference"][0][i]):
                differing_images += 1
    metrics = {name: coco_evaluate(ds, dets) for name, dets in found.items()}
    keys = ("map", "map_50", "map_75", "ar_100")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "command": "python benchmarks/nms_map_check.py",
        "images": len(ds.images),
        "detections": {k: len(v) for k, v in found.items()},
        "images_with_different_counts": differing_images,
        "decode_seconds": seconds,
        "metrics": {name: {k: m[k] for k in keys} for name, m in metrics.items()},
        "abs_diff": {k: abs(metrics["op"][k] - metrics["reference"][k]) for k in keys},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
