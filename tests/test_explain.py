"""Grad-CAM points at the region that decides the class: a tiny classifier learns red squares from green ones
on a noisy background, and its maps must peak on the square, wherever it is."""

import numpy as np
import pytest

from artnet.config import ModelConfig
from artnet.model import backbones, classifier
from artnet.model import explain

SIZE, SQUARE = 64, 14


def squares(n: int, seed: int):
    """Images with one red (class 0) or green (class 1) square at a random place; returns images, labels, corners."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 150, (n, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, n)
    corners = rng.integers(0, SIZE - SQUARE, (n, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        image[y:y + SQUARE, x:x + SQUARE] = (230, 30, 30) if label == 0 else (30, 230, 30)
    return images, labels, corners


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(0)
    net = classifier.build_classifier(backbones.get("tiny"), ModelConfig(backbone="tiny", weights="none",
                                                                         head_depth=0), 2, SIZE)
    classifier.set_trainable_blocks(net, backbones.get("tiny"), 2)
    net.compile(optimizer=keras.optimizers.Adam(3e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    images, labels, _ = squares(600, 0)
    net.fit(images.astype(np.float32), labels, epochs=12, batch_size=32, verbose=0)
    return net


def test_the_map_is_highest_on_the_deciding_square(model):
    images, labels, corners = squares(40, 1)
    assert (model.predict(images.astype(np.float32), verbose=0).argmax(1) == labels).mean() > 0.9
    cams, chosen = explain.GradCam(model).maps(images, labels)
    assert (chosen == labels).all()
    hits, contrast = 0, []
    for cam, (y, x) in zip(cams, corners):
        full = explain.upsample(cam, SIZE)
        inside = np.zeros((SIZE, SIZE), bool)
        inside[y:y + SQUARE, x:x + SQUARE] = True
        py, px = np.unravel_index(full.argmax(), full.shape)
        hits += y - 4 <= py < y + SQUARE + 4 and x - 4 <= px < x + SQUARE + 4
        contrast.append(full[inside].mean() / max(full[~inside].mean(), 1e-6))
    assert hits >= 0.85 * len(images), hits
    assert np.median(contrast) > 2.0, np.median(contrast)


def test_the_forward_is_the_models_and_its_feature_maps_give_the_textbook_maps(model):
    """`maps_of` weighs channels by the head's gradient at the pooled features; the textbook takes the gradient
    over the feature map through the backbone's pooling and averages it over space. Both from one forward."""
    import tensorflow as tf

    images, labels, _ = squares(8, 3)
    x = tf.constant(images.astype(np.float32))
    gradcam = explain.GradCam(model)
    logits, spatial = gradcam.forward(x)
    np.testing.assert_allclose(logits.numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)

    with tf.GradientTape() as tape:
        feature_map, pooled = gradcam.features(gradcam.preprocess(x), training=False)
        scores = pooled
        for layer in gradcam.head:
            scores = layer(scores, training=False)
        score = tf.gather(scores, tf.constant(labels, tf.int32), axis=1, batch_dims=1)
    weights = tf.reduce_mean(tape.gradient(score, feature_map), axis=(1, 2), keepdims=True)
    textbook = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy()
    textbook /= textbook.max(axis=(1, 2), keepdims=True)

    cams, chosen = gradcam.maps_of(spatial.numpy(), labels)
    assert (chosen == labels).all() and textbook.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cams, textbook, atol=1e-5)
    np.testing.assert_allclose(gradcam.maps(images, labels)[0], textbook, atol=1e-5)


def test_a_backbone_not_ending_in_average_pooling_is_refused():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3), keras.layers.GlobalMaxPooling2D()], name="backbone")
    x = backbone(keras.layers.Rescaling(1 / 255, name="preprocess")(inputs))
    with pytest.raises(ValueError, match="global average pooling"):
        explain.GradCam(keras.Model(inputs, keras.layers.Dense(2)(x)))


def test_overlay_is_an_image_of_the_same_size(model):
    images, labels, _ = squares(2, 2)
    overlays, chosen = explain.explained(model, images)
    assert len(overlays) == 2 and overlays[0].shape == (SIZE, SIZE, 3) and overlays[0].dtype == np.uint8
    assert chosen.shape == (2,)
