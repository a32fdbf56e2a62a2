"""torch.ops.ssdopt.decode_nms under FakeTensor tracing and torch.export (what AOTInductor consumes)."""

from __future__ import annotations

import torch
from nms_matching import random_head_outputs
from torch._subclasses.fake_tensor import FakeTensorMode

from ssdopt.ops import decode_nms
from ssdopt.ops.library import load_torch_ops

load_torch_ops()


class PostProcess(torch.nn.Module):
    """SSD post-processing as a module: deltas [B, A, 4], logits [B, A, C] -> the op's four outputs."""

    def __init__(self, anchors: torch.Tensor, max_detections: int = 50) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors)
        self.max_detections = max_detections

    def forward(self, deltas: torch.Tensor, logits: torch.Tensor):  # noqa: ANN201
        return torch.ops.ssdopt.decode_nms(
            deltas,
            logits,
            self.anchors,
            0.01,
            0.45,
            400,
            self.max_detections,
            [10.0, 10.0, 5.0, 5.0],
            True,
            0,
            False,
            320,
            320,
        )


def test_opcheck_schema_fake_and_dispatch():
    deltas, logits, anchors = random_head_outputs(2, 300, 5, seed=40)
    args = (deltas, logits, anchors, 0.01, 0.45, 400, 30, [10.0, 10.0, 5.0, 5.0], True, 0, False, 320, 320)
    torch.library.opcheck(
        torch.ops.ssdopt.decode_nms.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_fake_tensor_shapes_and_dtypes():
    deltas, logits, anchors = random_head_outputs(3, 100, 4, seed=41)
    real = (deltas.half(), logits.half(), anchors)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        num, boxes, scores, labels = decode_nms(*fake, max_detections=17)
    assert num.shape == (3,) and num.dtype == torch.int32
    assert boxes.shape == (3, 17, 4) and boxes.dtype == torch.float32
    assert scores.shape == (3, 17) and scores.dtype == torch.float32
    assert labels.shape == (3, 17) and labels.dtype == torch.int32


def test_torch_export_keeps_the_op_and_runs_with_another_batch():
    deltas, logits, anchors = random_head_outputs(2, 500, 6, seed=42)
    module = PostProcess(anchors)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(module, (deltas, logits), dynamic_shapes=({0: batch}, {0: batch}))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "ssdopt.decode_nms.default" in targets
    more_deltas, more_logits, _ = random_head_outputs(5, 500, 6, seed=43)
    expected = module(more_deltas, more_logits)
    got = exported.module()(more_deltas, more_logits)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
