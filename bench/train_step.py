"""The training step alone: artnet's custom step against Keras `fit`, on in-memory batches.

Separates the step from the data path in the one-node comparison (`bench/one_node.py`): the same model
(MobileNetV2, offline weights, the `mobilenet` preset's head; backbone frozen, or with `--phase 2` its top blocks
unfrozen as in fine-tuning), the same batches (random, in memory), 2 cores. Sides: Keras `fit` on an in-memory
tf.data; artnet's `trainer.make_train_step` in a plain process, with and without MultiWorkerMirroredStrategy; and
two of them again inside a one-worker Ray Train job as artnet starts it (Ray sets OMP_NUM_THREADS to the worker's
CPUs; artnet's run config sets its niceness): artnet's MWMS step, and Keras `fit` itself, whose ratio to plain
Keras is what being on Ray costs any training loop on this machine. Each side in its own process, one warm-up,
then `--steps` timed steps.

    python bench/train_step.py [--steps 40] [--phase 1|2]
Writes bench/results/train_step.json (phase 1) or train_step_phase2.json.
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
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results" / "train_step.json"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"
SIZE, BATCH, CLASSES = 224, 32, 3


def images_per_s(side: str, steps: int, phase: int) -> float:
    import keras
    import tensorflow as tf

    from artnet import presets
    from artnet.config import replace
    from artnet.model import backbones, classifier
    from artnet.train import trainer

    spec, cfg = backbones.get("mobilenet_v2"), replace(presets.preset("mobilenet").model, weights=str(WEIGHTS))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (BATCH * 4, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH * 4).astype(np.int32)

    def build():
        model = classifier.build_classifier(spec, cfg, CLASSES, SIZE)
        classifier.set_trainable_blocks(model, spec, presets.preset("mobilenet").train.unfreeze_blocks if phase == 2
                                        else 0)
        return model

    if side == "keras_fit":
        model = build()
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
        model.fit(data.take(3), verbose=0)
        start = time.perf_counter()
        model.fit(data.take(steps), verbose=0)
        return steps * BATCH / (time.perf_counter() - start)
    strategy = tf.distribute.get_strategy() if side == "artnet_step" else tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build()
    optimizer = trainer.make_optimizer(strategy, model, "float32", 1e-3)
    step = trainer.make_train_step(strategy, model, optimizer, BATCH)
    batches = [(tf.constant(x[i:i + BATCH]), tf.constant(y[i:i + BATCH])) for i in range(0, len(x), BATCH)]
    for images, labels in batches[:3]:
        step(images, labels)
    start, loss = time.perf_counter(), 0.0
    for i in range(steps):
        loss = loss + step(*batches[i % len(batches)])[0]
    float(loss)
    return steps * BATCH / (time.perf_counter() - start)


def in_ray_worker(side: str, steps: int, phase: int) -> float:
    """`side` inside a one-worker Ray Train job started as artnet starts its own (`one_node.one_worker_job`)."""
    from one_node import one_worker_job  # bench/ is this script's directory

    def loop(config):  # the worker is on this machine: it hands its figure back in a file
        Path(config["out"]).write_text(json.dumps(images_per_s(side, config["steps"], phase)))

    workdir = REPO / "work" / "bench_train_step"
    out = workdir / "in_ray_worker.json"
    one_worker_job(loop, {"steps": steps, "out": str(out)}, "train-step", str(workdir))
    return json.loads(out.read_text())


IN_RAY_WORKER = "_in_ray_worker"
SIDES = ("keras_fit", "artnet_step", "artnet_step_mwms", "artnet_step_mwms" + IN_RAY_WORKER, "keras_fit" + IN_RAY_WORKER)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--phase", type=int, choices=(1, 2), default=1)
    parser.add_argument("--side", choices=SIDES)
    args = parser.parse_args()
    if args.side:
        run = (in_ray_worker(args.side.removesuffix(IN_RAY_WORKER), args.steps, args.phase)
               if args.side.endswith(IN_RAY_WORKER) else images_per_s(args.side, args.steps, args.phase))
        print(json.dumps(run))
        return
    if not WEIGHTS.is_file():
        sys.exit(f"needs the offline weights under {SHARED} (set ARTNET_SHARED)")
    results = {"command": "python bench/train_step.py " + " ".join(sys.argv[1:]), "cpu_cores": os.cpu_count(),
               "phase": args.phase, "image_size": SIZE, "batch": BATCH, "steps": args.steps, "images_per_s": {}}
    for side in SIDES:
        out = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--phase",
                              str(args.phase)],
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results["images_per_s"][side] = round(json.loads(out.stdout.strip().splitlines()[-1]), 1)
        print(side, results["images_per_s"][side], flush=True)
    path = RESULTS if args.phase == 1 else RESULTS.with_name("train_step_phase2.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
