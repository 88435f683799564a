"""Distributed fine-tuning: the per-worker loop that Ray Train runs, and the driver `fit()`.

Each Ray Train worker runs MultiWorkerMirroredStrategy: MirroredStrategy over its own GPUs plus all-reduce
across workers. Keras 3 `fit` fails under multi-worker strategies here (ray#47464 / keras#20585), so the
step is a custom one: model and optimizer built in `strategy.scope()`, the Ray shard distributed with
`distribute_datasets_from_function`, the loss scaled by the global batch. Each epoch's validation is shared:
every worker scores its own disjoint share of the split (`pipeline.eval_shards`) and one all-reduce of
(confusion matrix, top-3 hits, loss sum) gives every worker the exact global figures, so all of them take the
same early-stop decision and run the same number of steps. Calibration and test are shared the same way.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from artnet import cluster, console, metrics
from artnet.config import JobConfig
from artnet.errors import UserError
from artnet.data import storage
from artnet.model import backbones
from artnet.model import bundle
from artnet.train import balance, schedule
from artnet.train.passes import Passes, distributed

CHECKPOINT_STATE = "state.json"
EXPLAINED_EXAMPLES = 12  # test paintings shown with their Grad-CAM maps in the MLflow run
# Ray Train's controller looks at its workers every 2 s by default, so a finished (or failed) worker group is seen
# up to 2 s late: measured 3.0 s from a loop's end to `fit` returning, 1.0 s at 0.5 s. A look is one small actor
# call per worker; a missed one is tolerated (Ray marks a worker dead after 10 minutes of them). A value the user
# set in the environment wins.
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
# Ray starts every worker process at niceness 15 (its raylet, GCS and agents, and the driver, run at 0), so the
# training worker yields the CPU to any of them at once (and the step's other threads wait for a preempted one).
# On 2 cores, alternating runs: the in-memory step in a Ray Train worker 44-61 images/s at 15, 63-72 at 0; a
# whole job's phases +6-10% (README, "One machine").
# Training workers run at 0, as Ray's job supervisor runs a submitted job's driver; decode tasks stay at Ray's
# default, so they yield to the step they feed (and Ray's reason for 15, a flood of tasks starving its GCS and
# raylet, ray-project/ray#24928, holds for them). A value the user set in the environment wins.
NICENESS_ENV, TRAINING_NICENESS = "RAY_worker_niceness", "0"


@dataclass
class TrainState:
    """Counters that a checkpoint carries so a restarted worker resumes exactly where it left off."""

    epoch: int = 0  # next epoch to run
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    stopped_phase: int = 0  # a phase that early stopping has ended
    identity: dict = field(default_factory=dict)  # what the weights fit (see `identity`): checked on resume

    def phase_losses(self, phase: int) -> list[float]:
        return [h["val_loss"] for h in self.history if h["phase"] == phase]


def precision_policy(precision: str, capabilities: list[tuple[int, int]]) -> str:
    """`auto`: float32 on CPUs; on GPUs mixed_bfloat16 where every GPU computes bfloat16 fast (compute capability
    8.0 and up: A100, H100, L4), else mixed_float16 with loss scaling (T4, V100)."""
    if precision != "auto":
        return precision
    if not capabilities:
        return "float32"
    return "mixed_bfloat16" if min(capabilities) >= (8, 0) else "mixed_float16"


def visible_gpus(use_gpu: bool, rank: int) -> list[tuple[int, int]]:
    """The compute capabilities of the GPUs TensorFlow sees on this worker. With `use_gpu` and none visible
    (a CPU-only TensorFlow build, or drivers missing on the node) training would silently run on the CPU: refused."""
    import tensorflow as tf

    from artnet.config import ConfigError

    found = [tuple(tf.config.experimental.get_device_details(d).get("compute_capability") or (0, 0))
             for d in tf.config.list_physical_devices("GPU")]
    if use_gpu and not found:
        raise ConfigError("scaling.use_gpu", f"is on, but TensorFlow on training worker {rank} sees no GPU",
                          "run the GPU image (Dockerfile / cluster.yaml) whose TensorFlow has CUDA, or drop --use-gpu")
    return found


# --------------------------------------------------------------------------------------------- TF helpers

def make_worker_sum(strategy):
    """All-reduce of a small array across workers, in float64 (counts stay exact, and sums of a split's shares
    equal the whole split's to rounding). Each replica contributes its worker's value divided by the worker's
    replica count, so the sum counts each worker once. Every worker must call it equally often."""
    import tensorflow as tf

    local_replicas = len(strategy.extended.worker_devices)

    @tf.function
    def reduce(value):
        per_replica = strategy.run(tf.identity, args=(value / local_replicas,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda values: reduce(tf.constant(np.asarray(values, np.float64))).numpy()


def agree_on_finite(grads):
    """Gradients made NaN on every replica if any replica of any worker has a non-finite one (else untouched):
    LossScaleOptimizer judges each replica's own, not yet all-reduced, gradients, so replicas could skip vs apply."""
    import tensorflow as tf

    present = [g for g in grads if g is not None]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
    nonfinite_replicas = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32))
    agreed = iter(tf.cond(nonfinite_replicas > 0, lambda: [g * np.nan for g in present], lambda: present))
    return [None if g is None else next(agreed) for g in grads]


def make_train_step(strategy, model, optimizer, global_batch: int, label_smoothing: float = 0.0,
                    class_counts=None, class_balance: str = "none", jit_compile: bool = False):
    """One distributed step: returns (mean loss over the global batch, correct predictions). With
    `class_balance` the loss is weighed or logit-adjusted from the training split's `class_counts`. Under float16
    loss scaling every replica of every worker skips (or applies) a step together (`agree_on_finite`).
    `jit_compile`: the forward and backward pass (nearly all the FLOPs) compiled by XLA; the optimizer's update,
    whose all-reduce runs across workers, stays outside it."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing,
                                                   reduction="none")
    variables = model.trainable_variables
    num_classes = model.output_shape[-1]
    counts = np.ones(num_classes) if class_counts is None else np.asarray(class_counts)
    weights = tf.constant(balance.class_weights(counts, class_balance))
    offsets = tf.constant(balance.logit_offsets(counts, class_balance))
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    @tf.function(jit_compile=jit_compile)
    def gradients(images, labels):  # images arrive as uint8: the model casts them on the device
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = loss_fn(tf.one_hot(labels, num_classes), logits + offsets) * tf.gather(weights, labels)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return loss, correct, tape.gradient(scaled, variables)

    def replica_step(images, labels):
        loss, correct, grads = gradients(images, labels)
        if loss_scaled:
            grads = agree_on_finite(grads)
        optimizer.apply_gradients(zip(grads, variables))
        return loss, correct

    @tf.function
    def step(images, labels):
        loss, correct = strategy.run(replica_step, args=(images, labels))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    return step


def warmup_cosine(total_steps: int, warmup_steps: int, peak: float):
    """`schedule.lr_at` as a Keras schedule of the optimizer's own step counter: the rate is computed on the
    device inside each step, with no per-step value sent from the host (a restored optimizer resumes its count)."""
    import keras
    from keras import ops

    span = float(max(1, total_steps - warmup_steps))

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = ops.cast(step, "float32")
            progress = ops.clip((step - warmup_steps) / span, 0.0, 1.0)
            cosine = 0.5 * peak * (1.0 + ops.cos(math.pi * progress))
            if not warmup_steps:
                return cosine
            return ops.where(step < warmup_steps, peak * (step + 1.0) / warmup_steps, cosine)

        def get_config(self):
            return {"total_steps": total_steps, "warmup_steps": warmup_steps, "peak": peak}

    return WarmupCosine()


def make_optimizer(strategy, model, policy: str, learning_rate):
    import keras

    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return optimizer


def make_predict(model):
    """The model's forward, traced once: (logits, last feature map) of a batch. The feature maps of the test
    images the run explains are kept from the pass that scores them (`explain.GradCam`)."""
    import tensorflow as tf

    from artnet.model import explain

    return tf.function(explain.GradCam(model).forward, reduce_retracing=True)


def collect_logits(predict, batches, num_classes: int, keep: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(labels, logits, examples) of this worker's share of a split: what calibration, the final scores and the
    explained examples come from (a share may be empty). `predict`: a batch's (logits, feature maps)
    (`make_predict`). `examples`: up to `keep` (images, labels, feature maps), at most keep / painters of each
    painter in the order they come, so that a share read painter by painter still shows several of them."""
    quota = -(-keep // num_classes)
    taken = np.zeros(num_classes, np.int64)
    labels, logits, kept = [np.zeros(0, np.int64)], [np.zeros((0, num_classes), np.float32)], []
    for batch in batches:
        scores, spatial = predict(batch["image"].astype(np.float32))
        logits.append(scores.numpy())
        labels.append(batch["label"].astype(np.int64))
        for i, label in enumerate(labels[-1]):
            if len(kept) == keep:
                break
            if taken[label] < quota:
                taken[label] += 1
                kept.append((batch["image"][i], label, spatial[i].numpy()))
    examples = tuple(map(np.stack, zip(*kept))) if kept else \
        (np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64), np.zeros((0, 1, 1, 1), np.float32))
    return np.concatenate(labels), np.concatenate(logits).astype(np.float64), examples


class Replay:
    """A worker's share of the validation split, decoded once and then replayed from memory while it fits in
    `budget` bytes: validation reads the same centre crops every epoch (and calibration once more), so decoding
    them again is wasted CPU. Past the budget (at 299 px, 10,000 images are 2.7 GB) it is read every time."""

    def __init__(self, read, budget: int):
        self.read, self.budget, self.batches = read, budget, None

    def __iter__(self):
        return iter(self.batches) if self.batches is not None else self._first_pass()

    def _first_pass(self):
        kept, size = [], 0
        for batch in self.read():
            size += batch["image"].nbytes
            kept = kept if kept is not None and size <= self.budget else None
            if kept is not None:
                kept.append(batch)
            yield batch
        self.batches = kept  # None (read again next time) when it did not fit


def evaluate(predict, batches, num_classes: int, worker_sum=None) -> tuple[dict, np.ndarray, tuple]:
    """Metrics, confusion matrix and (labels, logits) of an iterable of numpy batches. With `worker_sum` the
    batches are this worker's share and the tallies are summed over all workers first (each of them must call
    it). The logits are kept so that calibration can reuse the best epoch's instead of scoring validation again."""
    labels, logits, _ = collect_logits(predict, batches, num_classes)
    return (*_summarize(*metrics.tally(labels, logits, num_classes), worker_sum), (labels, logits))


def _summarize(cm: np.ndarray, top3: int, loss_sum: float, worker_sum=None) -> tuple[dict, np.ndarray]:
    """Metrics from tallies, summed over all workers first with `worker_sum` (one all-reduce)."""
    if worker_sum is not None:
        total = worker_sum(np.concatenate([cm.ravel(), [top3, loss_sum]]))
        cm = np.rint(total[:-2]).astype(np.int64).reshape(cm.shape)
        top3, loss_sum = int(round(total[-2])), float(total[-1])
    return metrics.summarize(cm, top3, loss_sum), cm


def _save_checkpoint(directory: str, model, optimizer_values: list | None, best_weights, state: TrainState) -> None:
    model.save_weights(os.path.join(directory, "model.weights.h5"))
    if best_weights is not None:
        np.savez(os.path.join(directory, "best.npz"), *best_weights)
    if optimizer_values is not None:
        np.savez(os.path.join(directory, "optimizer.npz"), *optimizer_values)
    with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
        json.dump(state.__dict__, f)


def _load_arrays(path: str) -> list[np.ndarray] | None:
    if not os.path.exists(path):
        return None
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


# ------------------------------------------------------------------------------------------ worker loop

def _load_state() -> TrainState:
    """The latest checkpoint's training state, or a fresh start: one small file read wherever the checkpoint is
    stored, so the worker knows it before it has a model to load the weights into (`_restore`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainState()
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CHECKPOINT_STATE}") as f:
        return TrainState(**json.loads(f.read()))


def next_epoch(state: TrainState, head_epochs: int, total_epochs: int) -> int:
    """The epoch the loop trains next (`total_epochs`: none): the rest of a phase early stopping ended is skipped."""
    if state.epoch < total_epochs and state.stopped_phase == schedule.phase_of(state.epoch, head_epochs):
        return head_epochs if state.epoch < head_epochs else total_epochs
    return state.epoch


def _restore(model) -> tuple[list | None, list | None]:
    """The model's weights, and (best weights, optimizer values), from Ray Train's latest checkpoint, or a fresh
    start (its state: `_load_state`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None, None
    with checkpoint.as_directory() as directory:
        model.load_weights(os.path.join(directory, "model.weights.h5"))
        return _load_arrays(os.path.join(directory, "best.npz")), _load_arrays(os.path.join(directory, "optimizer.npz"))


def _report(metrics_: dict, rank: int, model, optimizer_values, best_weights, state: TrainState,
            save_model: bool = False) -> None:
    """All ranks report (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(directory, model, optimizer_values, best_weights, state)
            if save_model:
                model.save(os.path.join(directory, "model.keras"))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics_, checkpoint=checkpoint)


def _train_epoch(train_data, step_fn, optimizer, global_batch: int) -> dict:
    """One pass over the shard. Loss and hits are summed as tensors and read once at the end: reading them each
    step (`float(loss)`) would make the host wait for every step before dispatching the next. `input_wait` is
    the share of the epoch spent waiting for the next batch: near 0 the model sets the pace, near 1 the data
    path starves it (more decode CPUs per accelerator)."""
    start, loss_sum, correct, steps, waited = time.perf_counter(), 0.0, 0.0, 0, 0.0
    iterator = [iter(train_data)]  # its only reference: `_release_in_background` drops it
    while True:
        asked = time.perf_counter()
        batch = next(iterator[0], None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        loss, hits = step_fn(*batch)
        loss_sum, correct, steps = loss_sum + loss, correct + hits, steps + 1
    seen, elapsed = steps * global_batch, time.perf_counter() - start
    _release_in_background(iterator)
    return {"train_loss": float(loss_sum) / max(steps, 1), "train_accuracy": float(correct) / max(seen, 1),
            "lr": float(optimizer.learning_rate.numpy()), "train_images": seen, "images_per_s": seen / elapsed,
            "input_wait": waited / elapsed}


def _release_in_background(holder: list) -> None:
    """Drop an epoch's exhausted distributed iterator on a helper thread. Under a strategy TensorFlow feeds the
    replicas through per-device datasets it builds itself, each with tf.data's autotuner on, and destroying the
    iterator waits for their autotuning threads to notice the cancellation: on the 2-core machine 6-28 s after
    each 14-s epoch (one-node epochs ended at 20.5 s or 41 s; found with gdb). Nothing needs it gone before the
    next epoch starts, so the wait leaves the training loop."""
    threading.Thread(target=holder.clear, name="artnet-release-iterator", daemon=True).start()


def _epoch_line(record: dict, total_epochs: int, stopped: bool) -> str:
    return (f"epoch {record['epoch']}/{total_epochs} [phase {record['phase']}] loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.3f} "
            f"top3 {record['val_top3_accuracy']:.3f} bal {record['val_balanced_accuracy']:.3f} "
            f"f1 {record['val_macro_f1']:.3f} | "
            f"{record['images_per_s']:.1f} img/s, input wait {record['input_wait']:.0%}"
            + (" | early stop" if stopped else ""))


def worker_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker. `config`: job (JobConfig), painters, train_rows, run_id, tracking_uri,
    credentials (`tracking.sealed_credentials`), progress (a `console.relay` actor or None)."""
    import ray.train

    job: JobConfig = config["job"]
    painters: list[str] = config["painters"]
    progress = config.get("progress")  # the driver's console (rank 0 only speaks)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    num_classes, size, tcfg = len(painters), job.data.image_size, job.train
    total_epochs = tcfg.head_epochs + tcfg.finetune_epochs
    train_shard = ray.train.get_dataset_shard("train")
    # Each step takes one batch per local replica: Ray Data keeps two steps' worth decoded ahead.
    passes = Passes(lambda: train_shard.iter_batches(batch_size=tcfg.batch_size, batch_format="numpy", drop_last=True,
                                                     local_shuffle_buffer_size=config["mixing_rows"] or None,
                                                     prefetch_batches=2 * local_replicas(job.scaling)))
    state = _load_state()
    if next_epoch(state, tcfg.head_epochs, total_epochs) < total_epochs:
        passes.start_next()  # Ray Data's start and the first decode tasks run while TensorFlow loads, model builds

    import keras
    import tensorflow as tf

    from artnet.model import classifier
    from artnet.track import tracking

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TensorFlow's first op: it sets up the collectives
    policy = precision_policy(tcfg.precision, visible_gpus(job.scaling.use_gpu, rank))
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(tcfg.seed)

    replicas = strategy.num_replicas_in_sync
    global_batch = tcfg.batch_size * replicas
    steps = max(1, schedule.steps_per_epoch(config["train_rows"], world,
                                            tcfg.batch_size * len(strategy.extended.worker_devices)))
    spec = backbones.get(job.model.backbone)
    with strategy.scope():
        model = classifier.build_classifier(spec, job.model, num_classes, size)
        if job.model.head_weights:  # a head trained on cached features (`artnet tune`): phase 1 is done
            classifier.load_head(model, job.model, num_classes, backbones.fetch_weights(job.model.head_weights))
    best_weights, optimizer_values = _restore(model)
    state.identity = config["identity"]
    if rank == 0 and state.epoch:
        console.say(progress, f"resuming at epoch {state.epoch + 1}")

    train_data = distributed(strategy, passes, size)
    if rank == 0:
        tracking.unseal(config.get("credentials"))
    run = tracking.WorkerRun(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if run is not None:
        run.mirror(state.history)  # epochs a lost worker group checkpointed but never logged (and MLflow's import)
    worker_sum, predict = make_worker_sum(strategy), make_predict(model)

    def split_batches(split: str):
        return ray.train.get_dataset_shard(split).iter_batches(batch_size=job.data.batch_size, batch_format="numpy")

    val_share = Replay(lambda: split_batches(f"val_{rank}"), job.data.eval_cache_mb << 20)
    test_share = Passes(lambda: split_batches(f"test_{rank}"))  # read once, after the last epoch

    phase, optimizer, step_fn, warned = 0, None, None, False
    best_val_scores = None  # (labels, logits) of this worker's validation share with the best weights
    while (epoch := next_epoch(state, tcfg.head_epochs, total_epochs)) < total_epochs:
        if schedule.phase_of(epoch, tcfg.head_epochs) != phase:
            phase = schedule.phase_of(epoch, tcfg.head_epochs)
            unfrozen = classifier.set_trainable_blocks(model, spec, tcfg.unfreeze_blocks if phase == 2 else 0)
            phase_epochs = tcfg.head_epochs if phase == 1 else tcfg.finetune_epochs
            peak = schedule.scaled_lr(tcfg.lr, global_batch) * (1.0 if phase == 1 else tcfg.finetune_lr_factor)
            rate = warmup_cosine(phase_epochs * steps, int(tcfg.warmup_epochs * steps), peak)
            optimizer = make_optimizer(strategy, model, policy, rate)
            if optimizer_values is not None and state.history and state.history[-1]["phase"] == phase:
                for variable, value in zip(optimizer.variables, optimizer_values):  # resuming inside a phase
                    variable.assign(value)
            optimizer_values = None  # consumed, or it belonged to the other phase
            step_fn = make_train_step(strategy, model, optimizer, global_batch, tcfg.label_smoothing,
                                      config["class_counts"], tcfg.class_balance, tcfg.jit_compile)
            if rank == 0:
                console.say(progress, f"phase {phase}: {len(model.trainable_variables)} trainable tensors, {unfrozen} "
                            f"backbone layers unfrozen; {replicas} replica(s) on {world} worker(s), global batch "
                            f"{global_batch}")
        record = {"epoch": epoch + 1, "phase": phase, **_train_epoch(train_data, step_fn, optimizer, global_batch)}
        record["images_per_s_per_replica"] = record["images_per_s"] / replicas
        started = time.perf_counter()
        val, _, val_scores = evaluate(predict, val_share, num_classes, worker_sum)
        record.update({f"val_{k}": v for k, v in val.items()})  # val_images: each image counted once
        record["val_seconds"] = time.perf_counter() - started  # read, decode, score and sum this worker's share
        # Every rank keeps the best epoch's weights (the same global loss, the same choice): all of them score
        # their shares of the final splits with those weights; rank 0 checkpoints and logs them.
        if val["loss"] < state.best_val_loss:
            state.best_val_loss, best_weights, best_val_scores = val["loss"], model.get_weights(), val_scores
        # The same global figures on every worker: the same decision, the same number of epochs for all.
        stopped = schedule.should_stop(state.phase_losses(phase) + [val["loss"]], tcfg.patience)
        state.history.append(record)
        state.epoch = epoch + 1
        if stopped:
            state.stopped_phase = phase
        # The next pass (or, after the last epoch, the test share): its first decode tasks run while the
        # checkpoint is saved.
        (passes if next_epoch(state, tcfg.head_epochs, total_epochs) < total_epochs else test_share).start_next()
        if rank == 0:
            console.say(progress, _epoch_line(record, total_epochs, stopped))
        _report({**record, "done": False}, rank, model, [v.numpy() for v in optimizer.variables], best_weights, state)
        if rank == 0:  # once its checkpoint is saved: a restart that re-runs the epoch cannot log it twice
            if run.failure is not None and not warned:
                console.say(progress, f"tracking server unreachable ({type(run.failure).__name__}): training goes "
                                      "on, its epochs are logged when it returns")
            warned = run.failure is not None
            run.mirror(state.history)

    if best_weights is not None:
        model.set_weights(best_weights)
    state.epoch = max(state.epoch, epoch)  # past the phase early stopping ended
    # The last epoch's validation metrics again (a Tune scheduler reads its metric in every report) and the run.
    final = {"epoch": state.epoch, "done": True, "run_id": config["run_id"],
             **{k: v for k, v in (state.history[-1] if state.history else {}).items() if k.startswith("val_")}}
    started = time.perf_counter()
    if best_val_scores is None:  # no epoch trained here (a re-run, or a restart after the best one): score again
        best_val_scores = collect_logits(predict, val_share, num_classes)[:2]
    calibration, test, cm, examples = _calibrate_and_test(predict, best_val_scores, test_share.batches(),
                                                          num_classes, tcfg.false_flag_rate, worker_sum)
    test["seconds"] = time.perf_counter() - started  # calibration on the best epoch's validation scores, then test
    final.update({f"test_{k}": v for k, v in test.items()})
    if rank == 0:
        run.flush(state.history)
        run.log_final(model, test, cm, painters, state.history, size,
                      bundle.metadata(painters, size, job.model.backbone, job.data.augment.standardize, calibration),
                      examples)
        console.say(progress, f"calibration: temperature {calibration.temperature:.2f}, val ECE "
                              f"{calibration.val_ece_before:.3f} -> {calibration.val_ece_after:.3f}, unknown below "
                              f"{calibration.threshold:.2f} confidence ({tcfg.false_flag_rate:.0%} of val flagged)")
        console.say(progress, f"test: accuracy {test['accuracy']:.3f}, top-3 {test['top3_accuracy']:.3f}, "
                              f"balanced {test['balanced_accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f} "
                              f"on {test['images']} images")
    # A re-run of a finished job trains no epoch: it keeps the optimizer state it was given.
    values = [v.numpy() for v in optimizer.variables] if optimizer is not None else optimizer_values
    _report(final, rank, model, values, best_weights, state, save_model=True)


def _calibrate_and_test(predict, val_scores: tuple, test_batches, num_classes: int, false_flag_rate: float,
                        worker_sum):
    """Temperature and unknown-painter threshold fitted on validation; test scored once, with its ECE before and
    after scaling (test plays no part in the fit). Every worker scores its own share of both splits and the
    figures are summed over all of them (`calibration`'s `total`), so all get the whole splits' numbers."""
    from artnet.model import calibration as calib

    val_labels, val_logits = val_scores
    fitted = calib.calibrate(val_logits, val_labels, false_flag_rate, total=worker_sum)
    test_labels, test_logits, examples = collect_logits(predict, test_batches, num_classes, keep=EXPLAINED_EXAMPLES)
    test, cm = _summarize(*metrics.tally(test_labels, test_logits, num_classes), worker_sum)
    scaled = fitted.probabilities(test_logits)
    test["ece_before"] = calib.expected_calibration_error(metrics.softmax(test_logits), test_labels, total=worker_sum)
    test["ece_after"] = calib.expected_calibration_error(scaled, test_labels, total=worker_sum)
    flagged, images = worker_sum([fitted.unknown(scaled).sum(), len(test_labels)])
    test["unknown_flagged"] = float(flagged / max(images, 1))
    return fitted, test, cm, examples


# ---------------------------------------------------------------------------------------------- driver

def absolute_paths(job: JobConfig) -> JobConfig:
    """The job with every local path made absolute (URIs left as they are): Ray workers run in another
    directory, or on another node, than the driver that read the command line."""
    from artnet.config import replace

    tracking_uri = job.tracking.tracking_uri
    if tracking_uri.startswith("sqlite:///"):
        tracking_uri = "sqlite:///" + storage.absolute(tracking_uri[len("sqlite:///"):])
    elif tracking_uri and storage.is_local(tracking_uri):
        tracking_uri = storage.absolute(tracking_uri)
    weights = job.model.weights if job.model.weights in ("imagenet", "none", "") else storage.absolute(job.model.weights)
    return replace(job, catalog=storage.absolute(job.catalog), workdir=storage.absolute(job.workdir),
                   storage_path=storage.absolute(job.storage_path),
                   model=replace(job.model, weights=weights, head_weights=storage.absolute(job.model.head_weights)),
                   search=replace(job.search, cache=storage.absolute(job.search.cache)),
                   tracking=replace(job.tracking, tracking_uri=tracking_uri,
                                    artifact_location=storage.absolute(job.tracking.artifact_location)))


def resolve(job: JobConfig) -> JobConfig:
    """Fill in what depends on the backbone, and check on the driver, before any job reaches Ray, everything that
    would otherwise fail later inside a worker: paths, the input size, the weights (built once here, so a
    file that does not fit or ImageNet weights that cannot be downloaded fail now), the checkpoint store."""
    from artnet.config import ConfigError, replace

    job.validate()
    job = absolute_paths(job)
    spec = backbones.get(job.model.backbone)
    size = job.data.image_size or spec.default_size
    if size < spec.min_size:
        raise ConfigError("data.image_size", f"is {size}, below {spec.name}'s minimum {spec.min_size}",
                          f"use {spec.min_size} or more (default {spec.default_size})")
    if job.model.weights not in ("none", ""):
        import keras

        backbones.build_backbone(spec, job.model, size)
        keras.backend.clear_session()
    if job.storage_path:
        storage.exists(job.storage_path)  # an unreachable or forbidden store fails here, with the fix
    return replace(job, data=replace(job.data, image_size=size))


def identity(job: JobConfig, painters: list[str]) -> dict[str, str]:
    """The settings a checkpoint's weights and optimizer state only fit: resuming a job name with others is
    refused (the weights would not load, or would load into a model that answers another question)."""
    import hashlib

    return {"model.backbone": job.model.backbone, "model.alpha": str(job.model.alpha),
            "model.head_depth": str(job.model.head_depth), "model.head_width": str(job.model.head_width),
            "model.head_halving": str(job.model.head_halving), "data.image_size": str(job.data.image_size),
            "painters": hashlib.sha256("\n".join(painters).encode()).hexdigest()[:16]}


def check_resumable(job: JobConfig, wanted: dict[str, str]) -> None:
    """Before any work: a job name that already has checkpoints resumes them, so they must fit this job."""
    from artnet.config import ConfigError

    folder = storage.join(results_dir(job), job.name)
    try:
        states = [f.path for f in storage.list_files(folder) if f.path.endswith("/" + CHECKPOINT_STATE)
                  and "/checkpoint_" in f.path]
    except FileNotFoundError:
        return
    if not states:
        return
    latest = storage.to_uri(folder, max(states))
    found = json.loads(storage.read_bytes(latest)).get("identity") or {}
    for key, value in found.items():
        if wanted.get(key) != value:
            what = "the painters (their names and order)" if key == "painters" else f"{key}={value}"
            raise ConfigError(key, f"differs from the checkpoints of job '{job.name}' ({what})",
                              f"use a new --name to start afresh, or resume with {what}")


def _check_manifest(manifest, painters: list[str]) -> dict[str, int]:
    from artnet.config import ConfigError

    counts = {s: int(sum(1 for x in manifest["split"].to_pylist() if x == s)) for s in ("train", "val", "test")}
    if len(painters) < 2:
        raise ConfigError("catalog", f"has {len(painters)} painter", "catalogue at least two painters")
    for split, n in counts.items():
        if n == 0:
            raise ConfigError("catalog", f"has no '{split}' images",
                              "re-run `artnet catalog` with a --split that gives every split a share")
    return counts


def class_counts(manifest, num_classes: int) -> list[int]:
    """Training images per painter (label order): what class balancing is computed from."""
    import pyarrow.compute as pc

    train = manifest.filter(pc.equal(manifest["split"], "train"))
    return np.bincount(train["label"].to_numpy(), minlength=num_classes).tolist()


DECODE_BUNDLE = {"CPU": 1}  # at least one CPU beside the training workers for Ray Data's decode tasks


def local_replicas(scaling) -> int:
    """Replicas one training worker runs: one per GPU it holds, else one (its CPU)."""
    return scaling.gpus_per_worker if scaling.use_gpu else 1


def worker_bundles(scaling) -> list[dict[str, float]]:
    """What each training worker takes: its CPUs, GPUs and one unit of `worker_resource`."""
    bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {}),
              **({scaling.worker_resource: 1} if scaling.worker_resource else {})}
    return [bundle] * scaling.num_workers


def _job_bundles(job: JobConfig) -> list[dict[str, float]]:
    return worker_bundles(job.scaling) + [DECODE_BUNDLE]


def plan_cluster(job: JobConfig) -> cluster.Plan:
    """The cluster the job will run on: the nodes up and those the autoscaler will add for its workers (and a
    CPU for decoding). Refused before any work if they fit on no node, up or addable."""
    wanted = cluster.current(_job_bundles(job))
    if wanted.unplaced:
        raise _unplaceable(job, wanted)
    return wanted


def wait_for_nodes(job: JobConfig, wanted: cluster.Plan) -> None:
    """Asks the autoscaler for the nodes `wanted` adds and waits for them (`scaling.wait_for_nodes_s`)."""
    from artnet.config import ConfigError

    try:
        cluster.ensure(_job_bundles(job), wanted, job.scaling.wait_for_nodes_s,
                       f"{job.scaling.num_workers} training worker(s)")
    except TimeoutError as e:
        raise ConfigError("scaling.wait_for_nodes_s", f"is {job.scaling.wait_for_nodes_s:g}: {e}",
                          "allow longer (GPU nodes can take 5-10 minutes to boot and pull the image), or see why "
                          "the autoscaler did not add them: `ray status`, and monitor.* in Ray's session logs") from None


def _unplaceable(job: JobConfig, wanted: cluster.Plan) -> Exception:
    """The one-line refusal for a request that no node, up or addable, has room for."""
    from artnet.config import ConfigError

    scaling, types, _ = job.scaling, *cluster.node_types()
    name = scaling.worker_resource
    if name:
        units = sum(n.get(name, 0) for n in wanted.up) + sum(
            math.inf if t.max_workers < 0 else t.max_workers * t.resources[name] for t in types if t.resources.get(name))
        if units < scaling.num_workers:
            return ConfigError("scaling.worker_resource", f"asks for one unit of '{name}' per worker, and the cluster "
                               f"has or can add {units:g} for {scaling.num_workers} worker(s)",
                               f"start the training nodes with --resources='{{\"{name}\": N}}' (cluster.yaml: a "
                               "node type's resources), or leave it empty")
    if all(b == DECODE_BUNDLE for b in wanted.unplaced):
        return ConfigError("scaling.num_workers", f"{scaling.num_workers} worker(s) x {scaling.cpus_per_worker} CPU "
                           f"take all {wanted.total('CPU'):g} CPUs of the cluster, none is left for decoding images",
                           "use fewer workers or cpus_per_worker, or add CPU nodes")
    addable = "; ".join(f"{t.name} {cluster.shape(t.resources)}" for t in types) or "none (no autoscaler)"
    return ConfigError("scaling.num_workers", f"{cluster.describe(wanted.unplaced)} fit on no node: nodes up "
                       f"{cluster.describe(wanted.up)}; node types the autoscaler can add: {addable}",
                       "use fewer workers, or fewer GPUs/CPUs per worker, or add a node type that holds one worker")


def results_dir(job: JobConfig) -> str:
    """Where a job's checkpoints (and a sweep's results) go: the storage path, or <workdir>/ray_results."""
    return job.storage_path or storage.join(job.workdir, "ray_results")


def _run_config(job: JobConfig, callbacks: list | None = None):
    import ray.train

    return ray.train.RunConfig(
        name=job.name, **storage.ray_storage(results_dir(job)), callbacks=callbacks or None,
        failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": worker_env()},  # merged into the job's runtime env
    )


def worker_env() -> dict[str, str]:
    """The training workers' environment: the object store and the MLflow TLS settings the driver uses (rank 0
    logs with them; the credentials go through `tracking.sealed_credentials`), and their niceness."""
    from artnet.track import tracking

    return {**storage.endpoint_env(), **tracking.client_env(),
            NICENESS_ENV: os.environ.get(NICENESS_ENV, TRAINING_NICENESS)}


def fit(job: JobConfig, parent_run_id: str | None = None, callbacks: list | None = None) -> dict:
    """Run one training job on the Ray cluster (local unless RAY_ADDRESS says otherwise); returns the final
    metrics, the MLflow run id and where the checkpoints are. With `parent_run_id` the job's MLflow run is
    nested under that run (a sweep's); `callbacks` are Ray Train callbacks (Tune's, in a fine-tuning trial)."""
    from artnet.data import catalog
    from artnet.track import tracking

    job.validate()
    manifest, painters = catalog.load(job.catalog)
    counts = _check_manifest(manifest, painters)

    def checked() -> JobConfig:  # seconds of one core, while Ray starts
        console.import_tensorflow()  # `resolve` builds the backbone: its C++ start-up lines go to a log file
        resolved = resolve(job)
        check_resumable(resolved, identity(resolved, painters))
        import mlflow  # noqa: F401  (start_job_run's import, off the critical path too)

        return resolved

    job = console.init_ray(meanwhile=checked)
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)  # Ray Train passes it on to its controller
    # A fine-tuning trial (Tune's `callbacks`) was planned by its sweep, and may run where the autoscaler's
    # node types cannot be read.
    wanted = plan_cluster(job) if callbacks is None else cluster.current()
    uri = tracking.tracking_uri(job)
    tracking.check_reachable(uri, job.tracking.artifact_location, wanted.nodes)
    cluster.refuse_local("storage_path", results_dir(job), wanted.nodes,
                         "checkpoints are written and read on the workers' nodes", "ray_results")
    wait_for_nodes(job, wanted)
    try:
        return _fit_on(job, uri, manifest, painters, counts, parent_run_id, callbacks)
    finally:
        if wanted.launch:
            cluster.release()


def _fit_on(job: JobConfig, uri: str, manifest, painters: list[str], counts: dict[str, int],
            parent_run_id: str | None, callbacks: list | None) -> dict:
    """`fit` on the cluster it runs on, its nodes up."""
    import ray
    from ray.train import DataConfig, ScalingConfig

    from artnet.data import pipeline
    from artnet.track import tracking
    from artnet.train.backend import tensorflow_trainer

    tags = tracking.identity_tags(job, manifest, painters)
    if parent_run_id:
        tags[tracking.PARENT_TAG] = parent_run_id
    run_id = tracking.start_job_run(job, uri, tags)
    bad = pipeline.new_tally(manifest.num_rows, job.data)
    datasets = {"train": pipeline.build_dataset(manifest, "train", job.data, train=True, bad_images=bad)}
    for split in ("val", "test"):  # each worker evaluates its share: `val_<rank>`, `test_<rank>`
        shares = pipeline.eval_shards(manifest, split, job.data, job.scaling.num_workers, bad_images=bad)
        datasets.update({f"{split}_{rank}": share for rank, share in enumerate(shares)})
    scaling = job.scaling
    with console.relay() as progress:
        trainer = tensorflow_trainer(
            train_loop_per_worker=worker_loop,
            train_loop_config={"job": job, "painters": painters, "train_rows": counts["train"], "run_id": run_id,
                               "identity": identity(job, painters),
                               "class_counts": class_counts(manifest, len(painters)),
                               "mixing_rows": pipeline.mixing_rows(manifest, job.data),
                               "tracking_uri": uri, "credentials": tracking.sealed_credentials(),
                               "progress": progress},
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=worker_bundles(scaling)[0]),
            run_config=_run_config(job, callbacks),
            datasets=datasets,
            # Only train is split by Ray (evenly, dropping a remainder); validation, calibration and test read
            # the `val_<rank>` / `test_<rank>` shares made for each worker.
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
        except BaseException as e:  # a failed job's run says so (and why), instead of staying RUNNING
            stop = ray.get(bad.verdict.remote())  # the bad-data budget, however TF and Ray wrapped its error
            error = UserError("the data", *stop) if stop else e
            tracking.fail_job_run(uri, run_id, error)
            if stop:
                raise error from e
            raise
    skipped = ray.get(bad.summary.remote())
    tracking.finish_job_run(uri, run_id, skipped, job.catalog)
    checkpoint = result.checkpoint.path
    if storage.is_s3(job.storage_path):
        checkpoint = f"s3://{checkpoint}"
    return {"metrics": result.metrics, "run_id": run_id, "tracking_uri": uri, "checkpoint": checkpoint,
            "bad_images": skipped, "painters": painters, "model_uri": tracking.model_uri(uri, run_id)}
