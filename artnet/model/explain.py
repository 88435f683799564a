"""Grad-CAM (Selvaraju et al. 2017): which regions of a painting drove the model towards a painter.

The gradient of the painter's logit with respect to the backbone's last convolutional feature map, averaged over
space, weighs each channel; the weighted sum of channels, through a ReLU, is the map. The last feature map is the
input of the backbone's global pooling, whichever backbone it is, so no layer name is hard-coded per backbone.
"""

from __future__ import annotations

import numpy as np


class GradCam:
    """Built once per model: raw RGB -> (last feature map, logits), differentiable between the two."""

    def __init__(self, model):
        import keras

        backbone = model.get_layer("backbone")
        pool = backbone.layers[-1]  # global pooling: its input is the last convolutional feature map
        self.features = keras.Model(backbone.inputs, [pool.input, backbone.output])
        self.preprocess = model.get_layer("preprocess")
        self.head = model.layers[model.layers.index(backbone) + 1:]  # the dense head, in order

    def maps(self, images: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps in [0, 1] at feature-map resolution, the class each map explains: `classes`, else the
        predicted painter)."""
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(images, np.float32))
        with tf.GradientTape() as tape:
            spatial, pooled = self.features(self.preprocess(x), training=False)
            logits = pooled
            for layer in self.head:
                logits = layer(logits, training=False)
            chosen = tf.argmax(logits, axis=-1, output_type=tf.int32) if classes is None else \
                tf.constant(np.asarray(classes, np.int32))
            score = tf.gather(logits, chosen, axis=1, batch_dims=1)
        grads = tape.gradient(score, spatial)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * spatial, axis=-1)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), chosen.numpy()


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A map at image resolution (bilinear)."""
    from PIL import Image

    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The painting with the map laid over it in a heat colour scale (uint8 RGB)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](upsample(cam, image.shape[0]))[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


def explained(model, images: np.ndarray, classes: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(each image with its map laid over it, the class explained)."""
    cams, chosen = GradCam(model).maps(images, classes)
    return [overlay(image, cam) for image, cam in zip(images, cams)], chosen
