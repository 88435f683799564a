"""What a training worker's input path hands TensorFlow (a process of its own: a collective strategy must be
created before any other TensorFlow op). Prints one JSON line."""

import json
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.pop("TF_CONFIG", None)  # a local strategy, whatever cluster the calling process was told of
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from artnet.train.passes import Passes, distributed, tf_dataset  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
batch = {"image": np.zeros((4, 8, 8, 3), np.uint8), "label": np.zeros(4, np.int32)}
passes = Passes(lambda: [batch] * 3)
ours = distributed(strategy, passes, 8)
plain = tf.distribute.MultiWorkerMirroredStrategy().distribute_datasets_from_function(
    lambda _: tf_dataset(passes, 8))
images, _ = next(iter(ours))
print(json.dumps({"checks_each_step_ours": iter(ours)._enable_get_next_as_optional,
                  "checks_each_step_plain": iter(plain)._enable_get_next_as_optional,
                  "device_dtype": [v.dtype.name for v in strategy.experimental_local_results(images)]}))
