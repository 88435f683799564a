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
wall time (TensorFlow's import included on both sides) split into before the first epoch, the epochs, and after
the last one; the sides alternate for `--rounds` rounds, and each ratio is given per round and as the median.
A third side runs the same Keras script as the loop of a one-worker Ray Train job (`keras_on_ray_train`): what
being on Ray Train costs any training loop on this machine (Ray's start, its actors, the cores its processes take
while the loop trains), so that artnet's ratios against it are artnet's own. Each round also times a null Ray
Train job (start Ray, one worker that only imports TensorFlow, shut down): the fixed part of that cost alone, and
the whole-job ratio without it. And each side's
phases are split into who used the cores (`CpuMeter`: every process's CPU time from /proc, once a second): for
artnet the training worker, the decode tasks, Ray Data's coordinator and Ray's other processes; for Keras its one
process; the rest is idle.

    python bench/one_node.py [--head-epochs 3] [--finetune-epochs 3] [--cpus 2] [--rounds 2] [--results PATH]
Writes bench/results/one_node.json (or PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
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


class LineClock:
    """Stands in for stdout while artnet runs: stamps each console line (artnet prints its progress there) with
    the seconds since `start`, and passes it on to stderr (stdout carries the result's JSON)."""

    def __init__(self, start: float):
        self.start, self.lines, self.partial = start, [], ""

    def write(self, text: str) -> int:
        self.partial += text
        *done, self.partial = self.partial.split("\n")
        self.lines += [(time.perf_counter() - self.start, line) for line in done if line.strip()]
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def first(self, prefix: str) -> float:
        return next(t for t, line in self.lines if line.startswith(prefix))

    def all(self, prefix: str) -> list[float]:
        return [t for t, line in self.lines if line.startswith(prefix)]


class CpuMeter:
    """Every process's CPU time, sampled once a second on a thread (Linux /proc), so that a window of the run
    can be split by who used the cores. Times are seconds since `start`, the side's own clock."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, start: float):
        self.start, self.samples, self.stop = start, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self._sample())
            self.stop.wait(1.0)

    def _sample(self) -> tuple[float, dict[int, tuple[float, str]]]:
        seen = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:  # it ended while we looked
                    continue
                seen[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / self.TICK, cmd)
        return time.perf_counter() - self.start, seen

    def shares(self, t0: float, t1: float, group) -> dict[str, float]:
        """Each group's share of the cores' time between t0 and t1 (`group(pid, cmdline)` names it), and "idle".
        A process first seen inside the window counts from zero (it started there); a Ray worker process is named
        after the task it runs at the last look."""
        self.stop.set()
        self.thread.join()
        before = max((s for s in self.samples if s[0] <= t0), key=lambda s: s[0], default=self.samples[0])[1]
        inside = [s for s in self.samples if t0 < s[0] <= t1]
        last = {}
        for _, seen in inside:
            last.update(seen)
        used: dict[str, float] = {}
        for pid, (seconds, cmd) in last.items():
            name = group(pid, cmd)
            used[name] = used.get(name, 0.0) + max(0.0, seconds - before.get(pid, (0.0, cmd))[0])
        capacity = (inside[-1][0] - t0) * len(os.sched_getaffinity(0)) if inside else 1.0
        used["idle"] = max(0.0, capacity - sum(used.values()))
        return {name: round(seconds / capacity, 3) for name, seconds in sorted(used.items())}


def artnet_group(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "driver"
    if cmd.startswith("ray::RayTrainWorker"):
        return "training worker"
    if cmd.startswith("ray::SplitCoordinator"):
        return "Ray Data coordinator"
    if cmd.startswith("ray::") and any(op in cmd for op in ("MapBatches", "Read", "IDLE")):
        return "decode tasks"
    return "Ray's other processes" if "ray" in cmd else "rest of the machine"


def keras_group(pid: int, cmd: str) -> str:
    return "keras process" if pid == os.getpid() else "rest of the machine"


def run_artnet(args, workdir: str) -> dict:
    import mlflow

    from artnet.train import trainer

    job = job_for(args, workdir)
    start = time.perf_counter()
    clock, stdout, meter = LineClock(start), sys.stdout, CpuMeter(start)
    sys.stdout = clock
    try:
        result = trainer.fit(job)  # which starts Ray on the machine as `artnet train` does
    finally:
        sys.stdout = stdout
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(result["tracking_uri"])
    rates, waits, val = ([m.value for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)]
                         for key in ("images_per_s", "input_wait", "val_seconds"))
    # Where the wall time goes: up to the first phase's start (Ray, the Train worker, TensorFlow, the model),
    # the epochs, and after the last epoch (calibration, test, the model and plots logged).
    ends = [clock.first("phase 1:")] + clock.all("epoch ")
    stages = {"before_training_s": ends[0], "after_training_s": wall - ends[-1],
              "epoch_seconds": [round(b - a, 1) for a, b in zip(ends, ends[1:])],  # training, validation, checkpoint
              "epoch_val_seconds": [round(v, 2) for v in val]}
    phase2 = clock.first("phase 2:")
    stages["cpu_shares"] = {"phase1": meter.shares(ends[0], phase2, artnet_group),
                            "phase2": meter.shares(phase2, ends[-1], artnet_group)}
    return {"wall_s": wall, "epoch_images_per_s": rates, "epoch_input_wait": [round(w, 2) for w in waits],
            "test_accuracy": result["metrics"].get("test_accuracy"), **stages}


def one_worker_job(loop, config: dict, name: str, workdir: str) -> None:
    """`loop` as a one-worker Ray Train job started as artnet starts its own: Ray on the machine
    (`console.init_ray`), artnet's TensorFlow backend (`artnet.train.backend`), the training workers' environment."""
    from ray.train import RunConfig, ScalingConfig

    from artnet import console
    from artnet.train.backend import tensorflow_trainer
    from artnet.train.trainer import worker_env

    console.init_ray()
    tensorflow_trainer(train_loop_per_worker=loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                       run_config=RunConfig(name=f"{name}-{int(time.time())}",
                                            storage_path=str(Path(workdir) / "ray_results"),
                                            worker_runtime_env={"env_vars": worker_env()})).fit()


def run_null(args, workdir: str) -> dict:
    """Ray's part of the fixed cost, with no artnet in it: start Ray, run a one-worker Ray Train job whose loop
    only imports TensorFlow, shut down."""
    import ray

    def loop(_config):
        import tensorflow  # noqa: F401  (the worker's own import, as artnet's worker pays it)

    start = time.perf_counter()
    one_worker_job(loop, {}, "null", workdir)
    ray.shutdown()
    return {"wall_s": time.perf_counter() - start}


def keras_training(args, workdir: str, start: float) -> dict:
    """What a user writes instead of artnet. Times are seconds since `start` on the machine's monotonic clock
    (`perf_counter`), so a Ray Train worker's times compare with its driver's. A user's script pays for importing
    TensorFlow too, as artnet's job does."""
    import keras
    import tensorflow as tf

    from artnet.data import catalog, pipeline
    from artnet.model import backbones, classifier
    from artnet.train import schedule, trainer

    job = job_for(args, workdir)
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
            self.first = getattr(self, "first", self.start)

        def on_train_batch_end(self, step, logs=None):
            self.steps, self.last = self.steps + 1, time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rates.append(self.steps * batch / (self.last - self.start))
            self.ended = time.perf_counter()  # after the epoch's validation

    timer, phase_starts = EpochTimer(), []
    for phase, epochs in ((1, tcfg.head_epochs), (2, tcfg.finetune_epochs)):
        phase_starts.append(time.perf_counter() - start)
        classifier.set_trainable_blocks(model, spec, tcfg.unfreeze_blocks if phase == 2 else 0)
        peak = schedule.scaled_lr(tcfg.lr, batch) * (1.0 if phase == 1 else tcfg.finetune_lr_factor)
        rate = trainer.warmup_cosine(epochs * steps, int(tcfg.warmup_epochs * steps), peak)
        model.compile(optimizer=keras.optimizers.Adam(rate), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[timer], verbose=0)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    return {"epoch_images_per_s": timer.rates, "test_accuracy": float(accuracy), "first_epoch_s": timer.first - start,
            "phase_starts": phase_starts, "last_epoch_end_s": timer.ended - start}


def keras_result(run: dict, wall: float, meter: CpuMeter, group) -> dict:
    phase_starts, ended = run["phase_starts"], run["last_epoch_end_s"]
    return {"wall_s": wall, "epoch_images_per_s": run["epoch_images_per_s"], "test_accuracy": run["test_accuracy"],
            "before_training_s": run["first_epoch_s"], "after_training_s": wall - ended,
            "cpu_shares": {"phase1": meter.shares(phase_starts[0], phase_starts[1], group),
                           "phase2": meter.shares(phase_starts[1], ended, group)}}


def run_keras(args, workdir: str) -> dict:
    start = time.perf_counter()
    meter = CpuMeter(start)
    run = keras_training(args, workdir, start)
    return keras_result(run, time.perf_counter() - start, meter, keras_group)


def run_keras_on_ray_train(args, workdir: str) -> dict:
    """The same Keras script as the loop of a one-worker Ray Train job, started as artnet starts its own (Ray on
    the machine, artnet's TensorFlow backend, the training workers' environment): what being on Ray Train costs
    any training loop here, the fixed start and the cores Ray's processes take while it trains. Against it,
    artnet's ratios are artnet's own."""
    start = time.perf_counter()
    meter, out = CpuMeter(start), Path(workdir) / "keras_on_ray_train.json"

    def loop(config):  # the worker is on this machine: it hands its result back in a file
        Path(config["out"]).write_text(json.dumps(keras_training(args, workdir, config["start"])))

    one_worker_job(loop, {"out": str(out), "start": start}, "keras", workdir)
    return keras_result(json.loads(out.read_text()), time.perf_counter() - start, meter, artnet_group)


def summary(run: dict, head_epochs: int) -> dict:
    rates = run["epoch_images_per_s"]
    out = {"wall_s": round(run["wall_s"], 1), "test_accuracy": round(float(run["test_accuracy"]), 3),
           "epoch_images_per_s": [round(r, 1) for r in rates],
           **{key: round(run[key], 1) for key in ("before_training_s", "after_training_s")}}
    out["cpu_shares"] = run["cpu_shares"]
    for key in ("epoch_input_wait", "epoch_seconds", "epoch_val_seconds"):  # artnet's own
        if key in run:
            out[key] = run[key]
    for phase, part in ((1, rates[:head_epochs]), (2, rates[head_epochs:])):
        warm = part[1:] if len(part) > 1 else part  # an epoch that builds graphs is not the steady rate
        out[f"phase{phase}_median"] = round(float(np.median(warm)), 1)
        out[f"phase{phase}_spread"] = round((max(warm) - min(warm)) / float(np.median(warm)), 2)
    return out


def machine() -> dict:
    """What the CPU is: 2-core machines named alike differed 3x in speed between sessions here (two "AMD EPYC"s),
    so a run's images/s are read against its CPU's family and vector units."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "cpu family", "model", "flags") and key not in info:
            info[key] = value
    flags = set(info.pop("flags", "").split())
    return {**info, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}


def net_wall_ratio(row: dict) -> float:
    """artnet's whole job less the null Ray Train job, over Keras': what is left once the fixed cost any Ray Train
    job pays on this machine is set aside (the null job's worker imports TensorFlow, as Keras' process does once)."""
    return round((row["artnet"]["wall_s"] - row["null_ray_train_wall_s"]) / row["keras"]["wall_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench_one_node"))
    parser.add_argument("--worker", choices=tuple(SIDES))
    args = parser.parse_args()
    args.workdir = str(Path(args.workdir).resolve())  # Ray Train workers run in a directory of their own
    if args.worker:
        print(json.dumps(SIDES[args.worker](args, args.workdir)))
        return
    from artnet.cli import run_catalog
    from artnet.config import CatalogConfig

    if not WEIGHTS.is_file():
        sys.exit(f"needs the shared paintings and weights under {SHARED} (set ARTNET_SHARED)")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), top_k=3), str(Path(args.workdir) / "catalog"))
    cores = ",".join(str(i) for i in range(args.cpus))
    results = {"command": "python bench/one_node.py " + " ".join(sys.argv[1:]), "cpus": args.cpus,
               "machine": machine(),
               "head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs, "rounds": []}
    def side_run(side: str) -> dict:
        out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--worker", side, "--workdir",
                              args.workdir, "--head-epochs", str(args.head_epochs), "--finetune-epochs",
                              str(args.finetune_epochs)], capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for _ in range(args.rounds):  # alternating sides, so a machine that drifts moves all alike
        row = {}
        for side in ("keras", "keras_on_ray_train", "artnet"):
            row[side] = summary(side_run(side), args.head_epochs)
            print(side, row[side], flush=True)
        row["null_ray_train_wall_s"] = round(side_run("null")["wall_s"], 1)
        print("null Ray Train job", row["null_ray_train_wall_s"], "s", flush=True)
        for against, suffix in (("keras", ""), ("keras_on_ray_train", "_vs_keras_on_ray_train")):
            for phase in (1, 2):
                row[f"phase{phase}_ratio{suffix}"] = round(row["artnet"][f"phase{phase}_median"]
                                                           / row[against][f"phase{phase}_median"], 2)
            row[f"wall_ratio{suffix}"] = round(row["artnet"]["wall_s"] / row[against]["wall_s"], 2)
        row["wall_ratio_net_of_null_job"] = net_wall_ratio(row)
        results["rounds"].append(row)
    for key in ("phase1_ratio", "phase2_ratio", "wall_ratio", "wall_ratio_net_of_null_job",
                "phase1_ratio_vs_keras_on_ray_train", "phase2_ratio_vs_keras_on_ray_train",
                "wall_ratio_vs_keras_on_ray_train"):
        values = [row[key] for row in results["rounds"]]
        results[key] = {"median": round(float(np.median(values)), 2), "min": min(values), "max": max(values)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "rounds"}, indent=2))


SIDES = {"artnet": run_artnet, "keras": run_keras, "keras_on_ray_train": run_keras_on_ray_train, "null": run_null}

if __name__ == "__main__":
    main()
