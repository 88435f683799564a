"""The classifier: raw RGB -> Rescaling -> backbone (BatchNorm always in inference mode) -> dense head ->
float32 logits. Freezing helpers unfreeze exactly the top N backbone blocks."""

from __future__ import annotations

from artnet.config import ModelConfig
from artnet.model.backbones import BackboneSpec, build_backbone, trainable_mask


def head_widths(depth: int, width: int, halving: bool) -> list[int]:
    """Units of each hidden head layer: the study's chain is depth 7, width 512, halving (512, 256, ..., 8)."""
    return [width >> i if halving else width for i in range(depth)]


STUDY_HEAD = ModelConfig(head_depth=7, head_width=512, head_halving=True, dropout=0.5)


def _features(spec: BackboneSpec, cfg: ModelConfig, size: int):
    """(raw RGB input, pooled backbone features): preprocessing inside the model, so it takes 0..255 RGB."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = layers.Rescaling(spec.scale, spec.offset, name="preprocess")(inputs)
    backbone = build_backbone(spec, cfg, size)
    backbone.trainable = False
    return inputs, backbone(x, training=False)  # frozen BatchNorm statistics, also once blocks are unfrozen


def _head(x, cfg: ModelConfig, num_classes: int):
    from keras import layers

    for i, units in enumerate(head_widths(cfg.head_depth, cfg.head_width, cfg.head_halving)):
        x = layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"head_dropout{i}")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def build_classifier(spec: BackboneSpec, cfg: ModelConfig, num_classes: int, size: int):
    import keras

    inputs, features = _features(spec, cfg, size)
    return keras.Model(inputs, _head(features, cfg, num_classes), name=f"artnet_{spec.name}")


def build_feature_extractor(spec: BackboneSpec, cfg: ModelConfig, size: int):
    """Raw RGB -> pooled features: what the embedding cache stores."""
    import keras

    inputs, features = _features(spec, cfg, size)
    return keras.Model(inputs, features, name=f"features_{spec.name}")


def build_head(cfg: ModelConfig, num_classes: int, feature_dim: int):
    """The classifier's head on its own (same layer names), for training on cached features."""
    import keras

    inputs = keras.Input(shape=(feature_dim,), name="features")
    return keras.Model(inputs, _head(inputs, cfg, num_classes), name="head")


def transplant_head(head, model) -> None:
    """Copy a head trained on features into a classifier with the same head config."""
    for layer in head.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())


def load_head(model, cfg: ModelConfig, num_classes: int, path: str) -> None:
    """Load head weights saved from `build_head` (a `.weights.h5` file) into a classifier."""
    head = build_head(cfg, num_classes, int(model.get_layer("backbone").output.shape[-1]))
    head.load_weights(path)
    transplant_head(head, model)


def set_trainable_blocks(model, spec: BackboneSpec, top_blocks: int) -> int:
    """Make exactly the top `top_blocks` backbone blocks trainable (BatchNorm layers stay frozen); the head
    is always trainable. Returns the number of trainable backbone layers."""
    import keras

    backbone = model.get_layer("backbone")
    if top_blocks <= 0:
        backbone.trainable = False
        return 0
    backbone.trainable = True
    mask = trainable_mask([layer.name for layer in backbone.layers], spec.block_end, top_blocks)
    count = 0
    for layer, on in zip(backbone.layers, mask):
        layer.trainable = on and not isinstance(layer, keras.layers.BatchNormalization)
        count += bool(layer.trainable and layer.weights)
    return count
