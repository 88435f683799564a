"""Run in a fresh process (TF must not be initialised yet): split the CPU into 2 logical devices, then train
the same model for a few steps with MirroredStrategy over both and with one device, at the same global batch,
through artnet's own step and input path (uint8 images, as the pipeline gives them). Arguments: the precision
policy, and `jit` to XLA-compile the steps. Prints JSON with the largest weight difference and losses."""

import json
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from artnet.config import ModelConfig  # noqa: E402
from artnet.model import backbones  # noqa: E402
from artnet.model.classifier import build_classifier, set_trainable_blocks  # noqa: E402
from artnet.train import trainer  # noqa: E402

PER_REPLICA, STEPS, SIZE, CLASSES = 4, 3, 32, 3
policy = sys.argv[1] if len(sys.argv) > 1 else "float32"
jit = sys.argv[2:] == ["jit"]
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (PER_REPLICA * 2 * STEPS, SIZE, SIZE, 3)).astype(np.uint8)
labels = rng.integers(0, CLASSES, len(images)).astype(np.int32)
spec = backbones.get("tiny")


def run(strategy, batch):
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = build_classifier(spec, ModelConfig(backbone="tiny", weights="none", dropout=0.0), CLASSES, SIZE)
    set_trainable_blocks(model, spec, 2)
    optimizer = trainer.make_optimizer(strategy, model, policy, trainer.warmup_cosine(8, 2, 0.01))
    step = trainer.make_train_step(strategy, model, optimizer, global_batch=PER_REPLICA * 2, jit_compile=jit)
    data = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch))
    initial = model.get_weights()
    losses = [float(step(x, y)[0]) for x, y in data]
    return initial, model.get_weights(), losses


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
single = tf.distribute.OneDeviceStrategy("/cpu:0")
_, w2, l2 = run(mirrored, PER_REPLICA)        # each replica takes its own per-replica batch
w0, w1, l1 = run(single, PER_REPLICA * 2)      # one device takes the whole global batch


def norm(a, b):
    return float(np.sqrt(sum(((x.astype(np.float64) - y) ** 2).sum() for x, y in zip(a, b))))


print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "max_weight_diff": max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(w1, w2)),
    "weight_diff_norm": norm(w1, w2), "update_norm": norm(w1, w0),
    "losses_mirrored": l2, "losses_single": l1, "finite": bool(np.isfinite(l2).all()),
}))
