"""MLflow models-from-code definition of an engine: no pickle, just this file plus the engine dir.

`mlflow.pyfunc.load_model(uri).predict(images)` loads the engine with its own backend (metadata
checked first) and returns fixed-size detections for a float32 [B, 3, H, W] batch in [0, 1].
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class EngineModel(mlflow.pyfunc.PythonModel):
    """Wraps one engine directory logged as the artifact `engine`."""

    def load_context(self, context: Any) -> None:
        from ssdopt.backends import get_backend
        from ssdopt.backends.base import Engine

        engine = Engine.open(context.artifacts["engine"])
        self._anchors = engine.anchors()
        self._runner = get_backend(engine.backend).load(engine.path)

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """np.ndarray is a hint MLflow accepts without inferring a schema from it (the batch is
        checked by the runner against the engine's input shape)."""
        from ssdopt.backends.base import HeadOutputs

        images = np.asarray(model_input, dtype=np.float32)
        result = self._runner.infer(images)
        if isinstance(result, HeadOutputs):
            if self._anchors is None:
                raise RuntimeError("engine has raw head outputs but no anchors.npy to decode them")
            result = result.decode(self._anchors, image_height=images.shape[2], image_width=images.shape[3])
        return {
            "num_detections": result.num_detections,
            "boxes": result.boxes,
            "scores": result.scores,
            "labels": result.labels,
        }


mlflow.models.set_model(EngineModel())
