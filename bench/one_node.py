"""One machine: artnet's `fit` (one Ray Train worker, the Ray Data pipeline) against plain Keras `model.fit` on
tf.data, side by side in one run.

Both train the same model (artnet's classifier builder: MobileNetV2 with the offline weights, the same head) on
the same catalog (the 3 painters of `bench/accuracy.py top3`), with the same batch size, image size, epochs per
phase, unfrozen blocks, optimizer and learning-rate schedule, each in its own process pinned to the same cores.
The Keras side is what a user would write instead: `tf.data` with AUTOTUNE (decode, resize, random crop, flip),
`model.fit` with validation each epoch, `model.evaluate` on test. artnet runs as a user runs it: `ray.init()` on
the machine, its own augmentation, evaluation, calibration and MLflow logging.
Reported: training images/s per epoch and phase (each side times its own training loop: from the epoch's first
step to its last, validation excluded), median and spread, artnet's input wait per epoch, and the whole job's
wall time; the two sides alternate for `--rounds` rounds, and each ratio is given per round and as the median.

    python bench/one_node.py [--head-epochs 3] [--finetune-epochs 3] [--cpus 2] [--rounds 2] [--results PATH]
Writes bench/results/one_node.json (or PATH).
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
RESULTS = REPO / "bench" / "results" / "one_node.json"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"


def job_for(args, workdir: str):
    from artnet import presets
    from artnet.config import override

    return override(presets.preset("mobilenet"), {
        "catalog": str(Path(workdir) / "catalog"), "workdir": workdir, "name": f"one-node-{int(time.time())}",
        "model.weights": str(WEIGHTS), "train.head_epochs": str(args.head_epochs),
        "train.finetune_epochs": str(args.finetune_epochs), "train.patience": "0", "train.seed": "0"})


def run_artnet(args, workdir: str) -> dict:
    import mlflow

    from artnet.train import trainer

    job = job_for(args, workdir)
    start = time.perf_counter()
    result = trainer.fit(job)  # which starts Ray on the machine as `artnet train` does
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(result["tracking_uri"])
    rates, waits = ([m.value for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)]
                    for key in ("images_per_s", "input_wait"))
    return {"wall_s": wall, "epoch_images_per_s": rates, "epoch_input_wait": [round(w, 2) for w in waits],
            "test_accuracy": result["metrics"].get("test_accuracy")}


def run_keras(args, workdir: str) -> dict:
    import keras
    import tensorflow as tf

    from artnet.data import catalog, pipeline
    from artnet.model import backbones, classifier
    from artnet.train import schedule, trainer

    job = job_for(args, workdir)
    start = time.perf_counter()
    manifest, painters = catalog.load(job.catalog)
    size, batch, tcfg = job.data.image_size, job.train.batch_size, job.train
    rows = {split: pipeline.split_rows(manifest, split) for split in ("train", "val", "test")}

    def load(path, label, train):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        if train:
            img = tf.image.resize(img, (int(size * 1.15), int(size * 1.15)))
            img = tf.image.random_flip_left_right(tf.image.random_crop(img, (size, size, 3)))
        else:
            img = tf.image.resize(img, (size, size))
        return img, label

    def dataset(split: str, train: bool):
        t = rows[split]
        ds = tf.data.Dataset.from_tensor_slices((t["uri"].to_pylist(), t["label"].to_numpy().astype(np.int32)))
        if train:
            ds = ds.shuffle(t.num_rows)
        ds = ds.map(lambda p, y: load(p, y, train), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch, drop_remainder=train).prefetch(tf.data.AUTOTUNE)

    train_ds, val_ds, test_ds = dataset("train", True), dataset("val", False), dataset("test", False)
    spec = backbones.get(job.model.backbone)
    model = classifier.build_classifier(spec, job.model, len(painters), size)
    steps = rows["train"].num_rows // batch

    class EpochTimer(keras.callbacks.Callback):
        """Training images/s of each epoch, from its first step to its last (Keras validates after)."""

        def __init__(self):
            super().__init__()
            self.rates: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.steps = time.perf_counter(), 0

        def on_train_batch_end(self, step, logs=None):
            self.steps, self.last = self.steps + 1, time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rates.append(self.steps * batch / (self.last - self.start))

    timer = EpochTimer()
    for phase, epochs in ((1, tcfg.head_epochs), (2, tcfg.finetune_epochs)):
        classifier.set_trainable_blocks(model, spec, tcfg.unfreeze_blocks if phase == 2 else 0)
        peak = schedule.scaled_lr(tcfg.lr, batch) * (1.0 if phase == 1 else tcfg.finetune_lr_factor)
        rate = trainer.warmup_cosine(epochs * steps, int(tcfg.warmup_epochs * steps), peak)
        model.compile(optimizer=keras.optimizers.Adam(rate), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[timer], verbose=0)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    return {"wall_s": time.perf_counter() - start, "epoch_images_per_s": timer.rates, "test_accuracy": accuracy}


def summary(run: dict, head_epochs: int) -> dict:
    rates = run["epoch_images_per_s"]
    out = {"wall_s": round(run["wall_s"], 1), "test_accuracy": round(float(run["test_accuracy"]), 3),
           "epoch_images_per_s": [round(r, 1) for r in rates]}
    if "epoch_input_wait" in run:  # artnet's share of each epoch spent waiting for its next batch
        out["epoch_input_wait"] = run["epoch_input_wait"]
    for phase, part in ((1, rates[:head_epochs]), (2, rates[head_epochs:])):
        warm = part[1:] if len(part) > 1 else part  # an epoch that builds graphs is not the steady rate
        out[f"phase{phase}_median"] = round(float(np.median(warm)), 1)
        out[f"phase{phase}_spread"] = round((max(warm) - min(warm)) / float(np.median(warm)), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench_one_node"))
    parser.add_argument("--worker", choices=("artnet", "keras"))
    args = parser.parse_args()
    if args.worker:
        run = run_artnet if args.worker == "artnet" else run_keras
        print(json.dumps(run(args, args.workdir)))
        return
    from artnet.cli import run_catalog
    from artnet.config import CatalogConfig

    if not WEIGHTS.is_file():
        sys.exit(f"needs the shared paintings and weights under {SHARED} (set ARTNET_SHARED)")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), top_k=3), str(Path(args.workdir) / "catalog"))
    cores = ",".join(str(i) for i in range(args.cpus))
    results = {"command": "python bench/one_node.py " + " ".join(sys.argv[1:]), "cpus": args.cpus,
               "head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs, "rounds": []}
    for _ in range(args.rounds):  # alternating sides, so a machine that drifts moves both alike
        row = {}
        for side in ("keras", "artnet"):
            out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--worker", side, "--workdir",
                                  args.workdir, "--head-epochs", str(args.head_epochs), "--finetune-epochs",
                                  str(args.finetune_epochs)], capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            row[side] = summary(json.loads(out.stdout.strip().splitlines()[-1]), args.head_epochs)
            print(side, row[side], flush=True)
        for phase in (1, 2):
            row[f"phase{phase}_ratio"] = round(row["artnet"][f"phase{phase}_median"]
                                               / row["keras"][f"phase{phase}_median"], 2)
        row["wall_ratio"] = round(row["artnet"]["wall_s"] / row["keras"]["wall_s"], 2)
        results["rounds"].append(row)
    for key in ("phase1_ratio", "phase2_ratio", "wall_ratio"):
        values = [row[key] for row in results["rounds"]]
        results[key] = {"median": round(float(np.median(values)), 2), "min": min(values), "max": max(values)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
