"""Grad-CAM (Selvaraju et al. 2017): which regions of a painting drove the model towards a painter.

The gradient of the painter's logit with respect to the backbone's last convolutional feature map, averaged over
space, weighs each channel; the weighted sum of channels, through a ReLU, is the map. The last feature map is the
input of the backbone's global pooling, whichever backbone it is, so no layer name is hard-coded per backbone.
"""

from __future__ import annotations

import numpy as np


class GradCam:
    """Built once per model: raw RGB -> (logits, last feature map) in one forward, and maps from that feature map.

    Every backbone here ends in global average pooling, so a logit's gradient over the feature map is the same at
    every place: the channel weights are the head's gradient at the pooled features (over the map's area, which
    the normalisation removes). The maps therefore need only the feature map, which the forward that scored the
    images anyway keeps (`forward`), and a backward through the small head, not the backbone's forward again
    (2-4 s of the training job's end on 2 cores, for 12 images, eager or traced)."""

    def __init__(self, model):
        import keras

        backbone = model.get_layer("backbone")
        pool = backbone.layers[-1]  # global pooling: its input is the last convolutional feature map
        if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
            raise ValueError("Grad-CAM needs a backbone that ends in global average pooling, not "
                             f"{type(pool).__name__}")
        self.features = keras.Model(backbone.inputs, [pool.input, backbone.output])
        self.preprocess = model.get_layer("preprocess")
        self.head = model.layers[model.layers.index(backbone) + 1:]  # the dense head, in order

    def forward(self, x):
        """(logits, last feature map) of a float32 batch: the model's forward, layer by layer."""
        spatial, logits = self.features(self.preprocess(x), training=False)
        for layer in self.head:
            logits = layer(logits, training=False)
        return logits, spatial

    def maps(self, images: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps in [0, 1] at feature-map resolution, the class each map explains: `classes`, else the
        predicted painter)."""
        import tensorflow as tf

        return self.maps_of(self.forward(tf.convert_to_tensor(np.asarray(images, np.float32)))[1], classes)

    def maps_of(self, spatial, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`maps` from the images' last feature maps (kept by `forward`)."""
        import tensorflow as tf

        spatial = tf.cast(spatial, tf.float32)
        pooled = tf.reduce_mean(spatial, axis=(1, 2))  # what the backbone's pooling hands the head
        with tf.GradientTape() as tape:
            tape.watch(pooled)
            logits = pooled
            for layer in self.head:
                logits = layer(logits, training=False)
            chosen = tf.argmax(logits, axis=-1, output_type=tf.int32) if classes is None else \
                tf.constant(np.asarray(classes, np.int32))
            score = tf.gather(logits, chosen, axis=1, batch_dims=1)
        weights = tf.cast(tape.gradient(score, pooled), tf.float32)[:, None, None, :]
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


def explained(model, images: np.ndarray, classes: np.ndarray | None = None,
              spatial: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(each image with its map laid over it, the class explained). `spatial`: the images' last feature maps,
    where a forward that scored them kept them (`GradCam.forward`)."""
    gradcam = GradCam(model)
    cams, chosen = gradcam.maps(images, classes) if spatial is None else gradcam.maps_of(spatial, classes)
    return [overlay(image, cam) for image, cam in zip(images, cams)], chosen
