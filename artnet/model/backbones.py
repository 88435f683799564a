"""Backbone registry: each entry knows its input size, its preprocessing (a Rescaling layer inside the model,
so a saved model takes raw RGB), its ordered unfreezable blocks, and how to load weights from "imagenet",
a local file, an s3:// URI (fetched once into a cache, checksum-verified) or none."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Callable

from artnet.config import ConfigError, ModelConfig
from artnet.data import storage


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    default_size: int
    min_size: int
    block_end: str  # regex for the layer that closes each block, bottom to top
    factory: Callable  # (**keras.applications kwargs) -> keras.Model
    scale: float = 1 / 127.5  # raw 0..255 RGB -> the range the ImageNet weights expect
    offset: float = -1.0


def _inception_v3(**kw):
    import keras

    return keras.applications.InceptionV3(**kw)


def _mobilenet_v2(**kw):
    import keras

    return keras.applications.MobileNetV2(**kw)


def _mobilenet(**kw):
    import keras

    return keras.applications.MobileNet(**kw)


def _tiny(input_shape=None, include_top=False, weights=None, pooling="avg", name="backbone", classes=None, alpha=None):
    """Two conv blocks: a backbone small enough for CPU tests of every code path (blocks, BatchNorm, weights)."""
    import keras
    from keras import layers

    if weights not in (None, "none"):
        raise ValueError("the tiny backbone has no pretrained weights")
    inputs = keras.Input(shape=input_shape or (64, 64, 3))
    x = inputs
    for i, filters in enumerate((8, 16), start=1):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"tiny_conv{i}")(x)
        x = layers.BatchNormalization(name=f"tiny_bn{i}")(x)
        x = layers.ReLU(name=f"tiny_block{i}")(x)
    x = layers.GlobalAveragePooling2D(name="tiny_pool")(x)
    return keras.Model(inputs, x, name=name)


BACKBONES: dict[str, BackboneSpec] = {
    "inception_v3": BackboneSpec("inception_v3", 299, 75, r"mixed\d+", _inception_v3),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", 224, 32, r"expanded_conv_project_BN|block_\d+_project_BN|out_relu",
                                 _mobilenet_v2),
    "mobilenet": BackboneSpec("mobilenet", 224, 32, r"conv_pw_\d+_relu", _mobilenet),
    "tiny": BackboneSpec("tiny", 64, 16, r"tiny_block\d+", _tiny, scale=1 / 255.0, offset=0.0),
}


def get(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError("model.backbone", f"is {name!r}", f"use one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


# ------------------------------------------------------------------------------------------- pure helpers

def block_ends(layer_names: list[str], pattern: str) -> list[int]:
    """Indices of the layers that close each block, bottom to top."""
    regex = re.compile(pattern)
    return [i for i, name in enumerate(layer_names) if regex.fullmatch(name)]


def trainable_mask(layer_names: list[str], pattern: str, top_blocks: int) -> list[bool]:
    """True for the layers of the top `top_blocks` blocks (and anything after the last block end)."""
    if top_blocks <= 0:
        return [False] * len(layer_names)
    ends = block_ends(layer_names, pattern)
    first = 0 if top_blocks >= len(ends) else ends[-top_blocks - 1] + 1
    return [i >= first for i in range(len(layer_names))]


# ------------------------------------------------------------------------------------------------ weights

def cache_dir() -> str:
    return os.environ.get("ARTNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "artnet"))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_weights(uri: str, sha256: str = "") -> str:
    """A local path for a weights file: local paths as they are, s3:// URIs downloaded once into the cache.
    With `sha256`, the file must match it."""
    if storage.is_s3(uri):
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        path = os.path.join(cache_dir(), "weights", key, os.path.basename(uri))
        if not os.path.exists(path) or (sha256 and sha256_of(path) != sha256):
            if not storage.exists(uri):
                raise ConfigError("model.weights", f"{uri} does not exist",
                                  "check the bucket and key of the weights file")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.part{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(storage.read_bytes(uri))
            os.replace(tmp, path)
    else:
        path = storage.resolve(uri)[1]
        if not os.path.exists(path):
            raise ConfigError("model.weights", f"file {uri} does not exist",
                              "pass an existing .h5/.weights.h5 file, an s3:// URI, 'imagenet' or 'none'")
    if sha256 and sha256_of(path) != sha256:
        raise ConfigError("model.weights_sha256", f"{uri} has sha256 {sha256_of(path)}, not {sha256}",
                          "check that the file is the one you meant, or correct the checksum")
    return path


def _classes_in_file(path: str) -> int | None:
    """Number of classes of a classification top stored in an .h5 weights file, if it has one."""
    import h5py

    found: list[int] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and "predictions" in name and obj.ndim == 2:
            found.append(int(obj.shape[1]))
        elif isinstance(obj, h5py.Dataset) and "Logits" in name and obj.ndim == 4:
            found.append(int(obj.shape[-1]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found[0] if found else None


def copy_weights_by_name(source, target) -> None:
    """Copy every weighted layer of `target` from the same-named layer of `source`; all must be found."""
    missing = []
    for layer in target.layers:
        if not layer.weights:
            continue
        try:
            src = source.get_layer(layer.name)
        except ValueError:
            missing.append(layer.name)
            continue
        layer.set_weights(src.get_weights())
    if missing:
        raise ValueError(f"weights file lacks layers {missing[:5]}{'...' if len(missing) > 5 else ''}")


def build_backbone(spec: BackboneSpec, cfg: ModelConfig, size: int):
    """The feature extractor (pooled features), named "backbone", with the configured weights."""
    kwargs = {"include_top": False, "pooling": "avg", "name": "backbone"}
    if spec.name.startswith("mobilenet"):
        kwargs["alpha"] = cfg.alpha
    shape = (size, size, 3)
    if cfg.weights in ("none", ""):
        return spec.factory(input_shape=shape, weights=None, **kwargs)
    if cfg.weights == "imagenet":
        try:
            return spec.factory(input_shape=shape, weights="imagenet", **kwargs)
        except Exception as e:  # offline cluster, blocked hub: say what to do instead
            raise ConfigError("model.weights", f"ImageNet weights for {spec.name} could not be downloaded "
                              f"({type(e).__name__}: {_first_line(e)})",
                              "pass a weights file or an s3:// URI: --weights FILE|s3://bucket/key.h5") from None
    path = fetch_weights(cfg.weights, cfg.weights_sha256)
    model = spec.factory(input_shape=shape, weights=None, **kwargs)
    try:
        model.load_weights(path)
        return model
    except Exception as first_error:
        try:
            classes = _classes_in_file(path)
        except OSError as e:
            raise ConfigError("model.weights", f"{cfg.weights} is not a readable weights file ({_first_line(e)})",
                              "pass a Keras .h5 / .weights.h5 file (model.save_weights), an s3:// URI, "
                              "'imagenet' or 'none'") from None
        if classes is None:
            raise ConfigError("model.weights", f"{cfg.weights} does not fit {spec.name} "
                              f"({_first_line(first_error)})",
                              f"pass weights saved from a {spec.name} model, or choose the matching "
                              "--backbone") from None
    # A file saved with its classification top: load it into a model with that top, then copy by layer name
    # (convolution weights do not depend on the input size).
    full = spec.factory(include_top=True, weights=None, classes=classes,
                        **{k: v for k, v in kwargs.items() if k not in ("include_top", "pooling", "name")})
    try:
        full.load_weights(path)
        copy_weights_by_name(full, model)
    except Exception as e:
        raise ConfigError("model.weights", f"{cfg.weights} does not fit {spec.name} ({_first_line(e)})",
                          f"pass weights saved from a {spec.name} model, or choose the matching --backbone") from None
    return model


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
