"""Who painted it: a logged model ranks the painters for a few images.

The model takes raw RGB (its preprocessing is inside it), so an image only goes through the same decode and
centre crop as the validation split. Unreadable images become rows with an error, never a crash.
"""

from __future__ import annotations

import numpy as np

from artnet import console, metrics
from artnet.config import PipelineConfig
from artnet.data import storage, transforms


def load_model(model_uri: str, tracking_uri: str | None = None):
    """A Keras model from an MLflow model URI (runs:/..., models:/..., a local or s3:// artifact path);
    `models:/` and `runs:/` URIs are looked up in `tracking_uri` (default: MLflow's current one)."""
    console.import_tensorflow()
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.keras.load_model(model_uri)


def top_k(probabilities: np.ndarray, painters: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row, the k most likely painters with their probabilities, most likely first."""
    order = np.argsort(-probabilities, axis=-1)[:, :k]
    return [[(painters[j], float(p[j])) for j in row] for p, row in zip(probabilities, order)]


def predict_uris(model, uris: list[str], painters: list[str], cfg: PipelineConfig, k: int = 3) -> list[dict]:
    """One row per URI: {"uri", "top_k": [(painter, probability), ...]} or {"uri", "error"}."""
    size = int(model.input_shape[1])
    images, rows = [], []
    for uri in uris:
        try:
            images.append(transforms.preprocess(storage.read_bytes(uri), size, cfg.max_pixels, cfg.augment))
            rows.append({"uri": uri})
        except (transforms.BadImage, OSError) as e:
            rows.append({"uri": uri, "error": str(e)})
    if images:
        probabilities = metrics.softmax(np.asarray(model.predict(np.stack(images).astype(np.float32), verbose=0), np.float64))
        ranked = iter(top_k(probabilities, painters, k))
        for row in rows:
            if "error" not in row:
                row["top_k"] = next(ranked)
    return rows
