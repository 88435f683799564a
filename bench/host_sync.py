"""Training images/s with and without a host sync every step, in one run.

The trainer used to read each step's loss and hits on the host (`float(loss)`), which makes the host wait for the
step to finish before it dispatches the next; it now sums them as tensors and reads them once an epoch
(`trainer._train_epoch`). Both loops here run artnet's own distributed train step (`trainer.make_train_step`,
MirroredStrategy over `--replicas` logical devices) on the same in-memory batches, alternating for `--rounds`
rounds; they differ only in when the host reads the loss. Two models: the `tiny` backbone (small steps, where
dispatch is the largest share) and MobileNetV2 with its top blocks training (the real workload).

    python bench/host_sync.py [--steps 60] [--rounds 3] [--replicas 2]
Writes bench/results/host_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "host_sync.json"
MODELS = {"tiny": ("tiny", 64, 2), "mobilenet_v2": ("mobilenet_v2", 128, 4)}  # backbone, image size, top blocks
BATCH = 16  # per replica


def loop(step_fn, batches, sync: bool) -> float:
    """images/s of one pass over `batches`; with `sync` the host reads every step's loss (the old trainer)."""
    start, loss_sum, steps = time.perf_counter(), 0.0, 0
    for images, labels in batches:
        loss, _ = step_fn(images, labels)
        loss_sum = loss_sum + (float(loss) if sync else loss)
        steps += 1
    float(loss_sum)  # the epoch's one read
    return steps * BATCH * step_fn.replicas / (time.perf_counter() - start)


def measure(name: str, args) -> dict:
    import keras
    import tensorflow as tf

    from artnet.config import ModelConfig
    from artnet.model import backbones, classifier
    from artnet.train import trainer

    backbone, size, blocks = MODELS[name]
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
    spec = backbones.get(backbone)
    with strategy.scope():
        model = classifier.build_classifier(spec, ModelConfig(backbone=backbone, weights="none"), 8, size)
        classifier.set_trainable_blocks(model, spec, blocks)
        optimizer = trainer.make_optimizer(strategy, model, "float32", 1e-4)
    global_batch = BATCH * args.replicas
    step_fn = trainer.make_train_step(strategy, model, optimizer, global_batch)
    step_fn.replicas = args.replicas
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.uniform(0, 255, (global_batch * 4, size, size, 3)).astype(np.float32),
         rng.integers(0, 8, global_batch * 4).astype(np.int32))).batch(global_batch).repeat().take(args.steps)
    batches = list(strategy.experimental_distribute_dataset(data))  # in memory: only the step loop is timed
    keras.utils.set_random_seed(0)
    loop(step_fn, batches[:5], sync=False)  # traces the step
    rates: dict[str, list[float]] = {"per_step_sync": [], "per_epoch_read": []}
    for _ in range(args.rounds):
        rates["per_step_sync"].append(loop(step_fn, batches, sync=True))
        rates["per_epoch_read"].append(loop(step_fn, batches, sync=False))
    out = {kind: {"median": round(float(np.median(r)), 1), "min": round(min(r), 1), "max": round(max(r), 1)}
           for kind, r in rates.items()}
    out["after_vs_before"] = round(out["per_epoch_read"]["median"] / out["per_step_sync"]["median"], 3)
    return {"backbone": backbone, "image_size": size, **out}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--model", choices=tuple(MODELS), help="measure one model in this process")
    args = parser.parse_args()
    if args.model:  # each model in its own process: two strategies in one process share collective keys
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
        print(json.dumps(measure(args.model, args)))
        return
    results = {"command": "python bench/host_sync.py " + " ".join(sys.argv[1:]), "device": "CPU (no GPU here)",
               "cpu_cores": os.cpu_count(), "replicas": args.replicas, "batch_per_replica": BATCH,
               "steps": args.steps, "rounds": args.rounds, "models": {}}
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, "--model", name, "--steps", str(args.steps), "--rounds",
                              str(args.rounds), "--replicas", str(args.replicas)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results["models"][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results["models"][name], flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
