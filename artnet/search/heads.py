"""Head-only training on cached backbone features: the same head that `artnet train` puts on the backbone
(`classifier.build_head`), trained on embeddings with no backbone in the loop, so a search trial costs
seconds instead of a pass of the CNN over every image per epoch.

One process, plain Keras `fit` on in-memory arrays (the multi-worker strategy is not needed for a head on
features). The schedule, early stopping and class balancing are the fine-tuning job's own rules
(`train.schedule`, `train.balance`), and metrics come from `artnet.metrics`, so a head's validation numbers
mean the same as a training job's.
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


@dataclass
class Features:
    """Backbone features of one split: x is (n, dim) float32, y the painter labels."""

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
    head.fit(train.x, keras.utils.to_categorical(train.y, num_classes),
             sample_weight=balance.class_weights(counts, train_cfg.class_balance)[train.y],
             batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[tracker])
    # A fresh, uncompiled copy: it saves and pickles without the training loss (a closure).
    trained = classifier.build_head(model_cfg, num_classes, train.x.shape[1])
    trained.set_weights(tracker.best_weights if tracker.best_weights is not None else head.get_weights())
    return HeadFit(trained, tracker.history)


def logits_of(head, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    return np.concatenate([np.asarray(head(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
                          or [np.zeros((0, head.output_shape[-1]), np.float32)])


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
            scores, _ = metrics.evaluate_logits(self.val.y, logits_of(self.head, self.val.x), self.num_classes)
            record.update({f"val_{k}": v for k, v in scores.items() if k != "images"})
            if scores["loss"] < self.best_loss:
                self.best_loss, self.best_weights = scores["loss"], self.head.get_weights()
            if schedule.should_stop([h["val_loss"] for h in self.history] + [scores["loss"]], self.patience):
                self.model.stop_training = True
        self.history.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
