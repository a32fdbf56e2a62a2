"""Precision lives in the graph: fp16 (graph-level casts) and int8 (explicit Q/DQ) ONNX artifacts."""
