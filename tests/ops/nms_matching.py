"""Helpers for SSDDecodeNMS tests: seeded random inputs and a set comparison of detections.

Two float32 implementations of the op agree up to rounding (exp, softmax). Rounding can only flip a
decision that sits on a boundary, so the comparison matches detections as sets (label, score within
`score_tol`, box within `box_tol`) and accepts an unmatched detection only when a boundary explains
it: its score is that close to the score threshold or to the last kept score of a full output, or an
IoU with another detection of its NMS group is within `iou_tol` of the IoU threshold, or it overlaps
(IoU > threshold - iou_tol) a better unmatched detection (a cascade of such a flip).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import torchvision


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]
    score: float
    label: int


def detections_of(outputs: tuple[torch.Tensor, ...], image: int) -> list[Detection]:
    num, boxes, scores, labels = (t.detach().cpu() for t in outputs)
    n = int(num[image])
    return [
        Detection(tuple(boxes[image, i].tolist()), float(scores[image, i]), int(labels[image, i]))
        for i in range(n)
    ]


def same_detection(a: Detection, b: Detection, score_tol: float, box_tol: float) -> bool:
    if a.label != b.label or abs(a.score - b.score) > score_tol:
        return False
    pairs = zip(a.box, b.box, strict=True)
    return all(abs(x - y) <= box_tol or (math.isnan(x) and math.isnan(y)) for x, y in pairs)


def match(
    g: list[Detection], r: list[Detection], score_tol: float, box_tol: float
) -> tuple[list[Detection], list[Detection]]:
    """Pairs detections of equal label, score within score_tol and box within box_tol; returns the rest."""
    by_label: dict[int, list[tuple[float, int]]] = {}
    for i, d in enumerate(g):
        by_label.setdefault(d.label, []).append((d.score, i))
    for entries in by_label.values():
        entries.sort()
    used = [False] * len(g)
    unmatched_r = []
    for dr in r:
        entries = by_label.get(dr.label, [])
        start = bisect.bisect_left(entries, (dr.score - score_tol, -1))
        hit = None
        for score, i in entries[start:]:
            if score > dr.score + score_tol:
                break
            if not used[i] and same_detection(g[i], dr, score_tol, box_tol):
                hit = i
                break
        if hit is None:
            unmatched_r.append(dr)
        else:
            used[hit] = True
    return [d for d, u in zip(g, used, strict=True) if not u], unmatched_r


def check_padding(outputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Rows past num_detections must be zeros with label -1; valid rows sorted by decreasing score."""
    num, boxes, scores, labels = (t.detach().cpu() for t in outputs)
    problems = []
    for b in range(num.shape[0]):
        n = int(num[b])
        if not (0 <= n <= scores.shape[1]):
            problems.append(f"image {b}: num_detections {n} out of range")
            continue
        if (boxes[b, n:] != 0).any() or (scores[b, n:] != 0).any() or (labels[b, n:] != -1).any():
            problems.append(f"image {b}: padding after {n} detections is not zeros / label -1")
        if n > 1 and (scores[b, 1:n] > scores[b, : n - 1]).any():
            problems.append(f"image {b}: scores not in decreasing order")
    return problems


def explained(
    d: Detection,
    own: list[Detection],
    other: list[Detection],
    unmatched: list[Detection],
    attrs: dict,
    score_tol: float,
    iou_tol: float,
) -> bool:
    thr = attrs.get("iou_threshold", 0.45)
    agnostic = attrs.get("class_agnostic", False)
    k = attrs.get("max_detections", 200)
    if abs(d.score - attrs.get("score_threshold", 0.01)) <= score_tol:
        return True
    for dets in (own, other):
        if len(dets) == k and d.score <= dets[-1].score + score_tol:
            return True
    peers = [
        e
        for e in own + other
        if e is not d and (agnostic or e.label == d.label) and e.score >= d.score - score_tol
    ]
    if not peers:
        return False
    overlaps = torchvision.ops.box_iou(torch.tensor([d.box]), torch.tensor([e.box for e in peers]))[0]
    for e, overlap in zip(peers, overlaps.tolist(), strict=True):
        if abs(overlap - thr) <= iou_tol:
            return True
        if e.score > d.score and overlap > thr - iou_tol and any(e is u for u in unmatched):
            return True
    return False


def compare_detections(
    got: tuple[torch.Tensor, ...],
    ref: tuple[torch.Tensor, ...],
    attrs: dict | None = None,
    score_tol: float = 2e-5,
    box_tol: float = 2e-3,
    iou_tol: float = 1e-4,
    max_unmatched: int = 50,
) -> list[str]:
    """Differences between two padded outputs that no rounding boundary explains (empty list: equal).

    More than `max_unmatched` unmatched detections in an image are reported without explanation.
    """
    attrs = attrs or {}
    problems = [f"got: {p}" for p in check_padding(got)] + [f"ref: {p}" for p in check_padding(ref)]
    for b in range(got[0].shape[0]):
        g, r = detections_of(got, b), detections_of(ref, b)
        unmatched_g, unmatched_r = match(g, r, score_tol, box_tol)
        unmatched = unmatched_g + unmatched_r
        if len(unmatched) > max_unmatched:
            problems.append(f"image {b}: {len(unmatched_g)} extra and {len(unmatched_r)} missing detections")
            continue
        for d in unmatched_g:
            if not explained(d, g, r, unmatched, attrs, score_tol, iou_tol):
                problems.append(f"image {b}: extra detection {d}")
        for d in unmatched_r:
            if not explained(d, r, g, unmatched, attrs, score_tol, iou_tol):
                problems.append(f"image {b}: missing detection {d}")
    return problems


def random_anchors(num_anchors: int, generator: torch.Generator, image_size: int = 320) -> torch.Tensor:
    """[A, 4] anchors (x1, y1, x2, y2): centres anywhere in the image (some beyond it), sizes 4..200 px."""
    centres = torch.rand(num_anchors, 2, generator=generator) * (image_size * 1.1) - image_size * 0.05
    sizes = torch.exp(torch.empty(num_anchors, 2).uniform_(math.log(4), math.log(200), generator=generator))
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)


def random_head_outputs(
    batch: int,
    num_anchors: int,
    num_classes: int,
    seed: int,
    logit_scale: float = 3.0,
    background_bias: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4]) resembling an SSD head's."""
    generator = torch.Generator().manual_seed(seed)
    anchors = random_anchors(num_anchors, generator)
    deltas = torch.randn(batch, num_anchors, 4, generator=generator) * torch.tensor([3.0, 3.0, 2.0, 2.0])
    logits = torch.randn(batch, num_anchors, num_classes, generator=generator) * logit_scale
    logits[..., 0] += background_bias
    return deltas, logits, anchors
