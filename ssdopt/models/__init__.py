"""torchvision SSD models: builders, checkpoints (zoo) and the reference training recipe (train)."""

from __future__ import annotations

from ssdopt.models.zoo import build_model, known_models, load_checkpoint, save_checkpoint

__all__ = ["build_model", "known_models", "load_checkpoint", "save_checkpoint"]
