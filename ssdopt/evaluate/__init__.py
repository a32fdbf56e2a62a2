"""Evaluation: COCO mAP by pycocotools (accuracy), latency, reports."""
