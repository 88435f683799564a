"""A logged model and what it needs to answer: the painter names in label order, its input size and its
calibration, all stored in the model's own MLmodel metadata. Wherever the model goes (a run, a registry version,
a copied folder), the names travel with it: there is no separate labels file to keep in sync."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artnet.errors import UserError
from artnet.model.calibration import Calibration

METADATA_KEY = "artnet"


def metadata(painters: list[str], size: int, backbone: str, standardize: bool, calibration: Calibration) -> dict:
    """The `metadata=` a model is logged with (`standardize`: the per-image whitening its inputs went through)."""
    return {METADATA_KEY: {"painters": list(painters), "image_size": int(size), "backbone": backbone,
                           "standardize": bool(standardize), "calibration": calibration.to_dict()}}


@dataclass
class ModelBundle:
    model: object  # a Keras model: raw 0..255 RGB in, logits out
    painters: list[str]
    image_size: int
    backbone: str
    standardize: bool
    calibration: Calibration
    uri: str

    def preprocess(self, data: bytes, max_pixels: int) -> np.ndarray:
        """Image bytes as the model saw validation images: decoded, centre-cropped, whitened if it was trained so."""
        from artnet.config import AugmentConfig
        from artnet.data import transforms

        return transforms.preprocess(data, self.image_size, max_pixels, AugmentConfig(standardize=self.standardize))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a batch of raw RGB images."""
        return self.calibration.probabilities(self.logits(images))

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(np.asarray(images, np.float32)), np.float64)


def read_metadata(model_uri: str) -> dict:
    """artnet's metadata of a logged model, or a clear error for a model that has none."""
    import re

    import mlflow

    if not re.match(r"^[a-zA-Z][\w+.-]*:", model_uri):  # a copied folder: its MLmodel, no tracking store to ask
        metadata = mlflow.models.Model.load(model_uri).metadata
    else:
        metadata = mlflow.models.get_model_info(model_uri).metadata
    found = (metadata or {}).get(METADATA_KEY)
    if not found:
        raise UserError(model_uri, "has no artnet metadata (painter names, input size, calibration)",
                        "use a model logged by `artnet train` or `artnet tune`")
    return found


def load(model_uri: str, tracking_uri: str | None = None) -> ModelBundle:
    """A model from an MLflow model URI (`models:/NAME@ALIAS`, `runs:/...`, `models:/m-...`, a local or s3://
    folder); registry and run URIs are looked up in `tracking_uri` (default: MLflow's current one)."""
    from artnet import console

    console.import_tensorflow()
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    meta = read_metadata(model_uri)
    model = mlflow.keras.load_model(model_uri)
    return ModelBundle(model=model, painters=list(meta["painters"]), image_size=int(meta["image_size"]),
                       backbone=meta.get("backbone", ""), standardize=bool(meta.get("standardize", False)),
                       calibration=Calibration(**meta["calibration"]),
                       uri=model_uri)
