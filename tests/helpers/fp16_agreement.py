"""One worker of a two-process MultiWorkerMirroredStrategy on loopback (CPU), training a tiny model under
mixed_float16 through artnet's own optimizer and step. Step 1: normal batches on both workers. Step 2: worker 1's
batch holds a huge value (inf in float16), so only its gradients are non-finite. Step 3: normal again. After each
step it prints a JSON line: weight digest and loss scale. A step that does not finish within the step timeout
prints {"hung": step} and exits 3 (workers that disagree run different collectives and wait forever).

usage: fp16_agreement.py TASK_INDEX PORT0 PORT1 [off]   (`off`: the step without the cross-worker agreement)"""

import hashlib
import json
import os
import sys
import threading

task, ports, agreement = int(sys.argv[1]), sys.argv[2:4], sys.argv[4:] != ["off"]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": task}})
STEP_TIMEOUT = float(os.environ.get("FP16_AGREEMENT_STEP_TIMEOUT", "60"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any dataset work: it sets up the collectives

import keras  # noqa: E402

from artnet.train import trainer  # noqa: E402

if not agreement:
    trainer.agree_on_finite = lambda grads: grads  # the step as it was: each replica judges its own gradients

PER_WORKER, FEATURES, CLASSES = 4, 6, 3
keras.mixed_precision.set_global_policy("mixed_float16")
keras.utils.set_random_seed(7)
with strategy.scope():
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(CLASSES, dtype="float32")])
optimizer = trainer.make_optimizer(strategy, model, "mixed_float16", 1e-3)
step = trainer.make_train_step(strategy, model, optimizer, PER_WORKER * strategy.num_replicas_in_sync)

rng = np.random.default_rng(task)  # each worker its own data
batches = [rng.normal(size=(PER_WORKER, FEATURES)).astype(np.float32) for _ in range(3)]
if task == 1:
    batches[1][0, 0] = 1e30  # float16's largest is 65504: inf in the forward pass, non-finite gradients
labels = [rng.integers(0, CLASSES, PER_WORKER).astype(np.int32) for _ in range(3)]
# As the worker loop feeds batches: each worker's own dataset through distribute_datasets_from_function.
data = strategy.distribute_datasets_from_function(
    lambda _: tf.data.Dataset.from_tensor_slices((np.stack(batches), np.stack(labels))))


def report(record):
    print(json.dumps(record), flush=True)


def digest():
    weights = model.get_weights()
    return {"sha": hashlib.sha256(b"".join(w.astype(np.float32).tobytes() for w in weights)).hexdigest()[:16],
            "sum": float(sum(w.astype(np.float64).sum() for w in weights)),
            "scale": float(optimizer.dynamic_scale.numpy())}


report({"step": 0, "replicas": strategy.num_replicas_in_sync, **digest()})
for number, (x, y) in enumerate(data, start=1):
    watchdog = threading.Timer(STEP_TIMEOUT, lambda n=number: (report({"hung": n}), os._exit(3)))
    watchdog.start()
    loss, _ = step(x, y)
    watchdog.cancel()
    report({"step": number, "loss": float(loss), **digest()})
