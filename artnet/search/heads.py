"""Head-only training on cached backbone features: the same head that `artnet train` puts on the backbone
(`classifier.build_head`), trained on embeddings with no backbone in the loop, so a search trial costs
seconds instead of a pass of the CNN over every image per epoch.

One process, plain Keras `fit` (the multi-worker strategy is not needed for a head on features). The features
are read where they lie, float16 or float32, read-only object-store views in a Tune trial: each batch is
gathered, cast to float32 and one-hot labelled on its own, and validation is scored a chunk at a time, so a
trial never makes a float32 or one-hot copy of a whole split (Keras given the arrays would make both). The
schedule, early stopping and class balancing are the fine-tuning job's own rules (`train.schedule`,
`train.balance`), and metrics come from `artnet.metrics`, so a head's validation numbers mean the same as a
training job's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from artnet import metrics
from artnet.config import ModelConfig, TrainConfig
from artnet.train import balance, schedule

HEAD_BATCH = 256  # features are small: large batches, and the learning rate scales with them
SCORE_ROWS = 4096  # rows a head scores at a time (validation, test)
# A trial process's own memory besides the head and its batches: Python, TensorFlow, Keras, Ray's worker. A
# head trial (3 x 1024 units, 100 painters) on 20k x 2048 features read in place peaked at 0.54 GB (float32)
# and 0.62 GB (float16) of private resident memory; the features stayed shared (the object store's pages).
TRIAL_PROCESS_BYTES = 512 << 20
PREFETCHED_BATCHES = 16  # tf.data's AUTOTUNE prefetch of training batches, an upper bound


@dataclass
class Features:
    """Backbone features of one split: x is (n, dim) float32 or float16 (possibly a read-only view), y the
    painter labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class HeadFit:
    model: object  # the Keras head, with its best-on-validation weights when validation was given
    history: list[dict]


def fit_head(train: Features, num_classes: int, model_cfg: ModelConfig, train_cfg: TrainConfig, epochs: int, *,
             val: Features | None = None, on_epoch: Callable[[dict], None] | None = None,
             batch_size: int = HEAD_BATCH) -> HeadFit:
    """Train a head on features for `epochs` (early stopping on validation loss with `train_cfg.patience`);
    `on_epoch` receives each epoch's record (train loss, and val metrics when `val` is given)."""
    from artnet.model import classifier

    keras.utils.set_random_seed(train_cfg.seed)
    head = classifier.build_head(model_cfg, num_classes, train.x.shape[1])
    counts = np.bincount(train.y, minlength=num_classes)
    offsets = balance.logit_offsets(counts, train_cfg.class_balance)
    steps_per_epoch = math.ceil(len(train.y) / batch_size)
    total, warmup = epochs * steps_per_epoch, int(train_cfg.warmup_epochs * steps_per_epoch)
    peak = schedule.scaled_lr(train_cfg.lr, batch_size)
    rate = keras.optimizers.schedules.CosineDecay(0.0 if warmup else peak, decay_steps=max(1, total - warmup),
                                                  warmup_target=peak if warmup else None, warmup_steps=warmup)
    cross_entropy = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=train_cfg.label_smoothing)

    def loss(y_true, logits):  # logit adjustment lives in the training loss only
        return cross_entropy(y_true, logits + offsets)

    head.compile(optimizer=keras.optimizers.Adam(rate), loss=loss)
    tracker = _EpochTracker(head, val, num_classes, train_cfg.patience, on_epoch)
    batches = _Batches(train, num_classes, balance.class_weights(counts, train_cfg.class_balance), batch_size,
                       train_cfg.seed)
    head.fit(batches, epochs=epochs, shuffle=False, verbose=0, callbacks=[tracker])
    # A fresh, uncompiled copy: it saves and pickles without the training loss (a closure).
    trained = classifier.build_head(model_cfg, num_classes, train.x.shape[1])
    trained.set_weights(tracker.best_weights if tracker.best_weights is not None else head.get_weights())
    return HeadFit(trained, tracker.history)


def logits_of(head, x: np.ndarray, batch_size: int = SCORE_ROWS) -> np.ndarray:
    return np.concatenate([np.asarray(head(np.asarray(x[i:i + batch_size], np.float32), training=False))
                           for i in range(0, len(x), batch_size)]
                          or [np.zeros((0, head.output_shape[-1]), np.float32)])


def evaluate(head, features: Features, num_classes: int, batch_size: int = SCORE_ROWS) -> dict[str, float]:
    """`metrics.evaluate_logits` of a head on features, tallied a chunk at a time: the logits of a whole split
    (n x painters, and float64 temporaries of that size) are never held at once."""
    cm, top3, loss_sum = np.zeros((num_classes, num_classes), np.int64), 0, 0.0
    for i in range(0, len(features.y), batch_size):
        logits = logits_of(head, features.x[i:i + batch_size], batch_size)
        c, t, s = metrics.tally(features.y[i:i + batch_size], logits, num_classes)
        cm, top3, loss_sum = cm + c, top3 + t, loss_sum + s
    return metrics.summarize(cm, top3, loss_sum)


def trial_memory(train: Features, num_classes: int, widest: int, depth: int, batch_size: int = HEAD_BATCH) -> int:
    """Bytes a head trial allocates itself, with half again as margin: its process, the head (weights, gradients,
    Adam's two moments, the best weights kept) for up to `depth` layers of `widest` units, the prefetched
    batches and one validation chunk's scoring. The features are not counted: a trial reads them in place
    (the object store's copy, one per node, shared by every trial there)."""
    dim = train.x.shape[1]
    params = dim * widest + max(depth - 1, 0) * widest * widest + widest * num_classes if depth else dim * num_classes
    batches = PREFETCHED_BATCHES * batch_size * (dim * (train.x.itemsize + 4) + num_classes * 4 + 16)
    scoring = SCORE_ROWS * (dim * 4 + num_classes * 4 * 9)  # float32 input and logits, tally's float64 copies
    return int(1.5 * (TRIAL_PROCESS_BYTES + 5 * 4 * params + batches + scoring))


class _Batches(keras.utils.PyDataset):
    """Training batches drawn from features left where they are: each one gathered (rows ascending), cast to
    float32, its labels one-hot and weighted, in a new seeded order every epoch."""

    def __init__(self, train: Features, num_classes: int, class_weights: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.class_weights = train.x, train.y, np.asarray(class_weights, np.float32)
        self.num_classes, self.batch_size = num_classes, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(self.y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i: int):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        y = self.y[rows]
        onehot = np.zeros((len(rows), self.num_classes), np.float32)
        onehot[np.arange(len(rows)), y] = 1.0
        return self.x[rows].astype(np.float32, copy=False), onehot, self.class_weights[y]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.y))


class _EpochTracker(keras.callbacks.Callback):
    """Per epoch: validation metrics, the record to `on_epoch`, best weights, early stop."""

    def __init__(self, head, val: Features | None, num_classes: int, patience: int, on_epoch):
        super().__init__()
        self.head, self.val, self.num_classes, self.patience, self.on_epoch = head, val, num_classes, patience, on_epoch
        self.history: list[dict] = []
        self.best_weights = None
        self.best_loss = math.inf

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, "train_loss": float((logs or {}).get("loss", math.nan))}
        if self.val is not None:
            scores = evaluate(self.head, self.val, self.num_classes)
            record.update({f"val_{k}": v for k, v in scores.items() if k != "images"})
            if scores["loss"] < self.best_loss:
                self.best_loss, self.best_weights = scores["loss"], self.head.get_weights()
            if schedule.should_stop([h["val_loss"] for h in self.history] + [scores["loss"]], self.patience):
                self.model.stop_training = True
        self.history.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
