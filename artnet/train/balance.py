"""Imbalance-aware training as pure functions of the training split's painter counts (numpy only).

The shared paintings run from 40 to 877 per painter. Plain cross-entropy then favours the big painters;
both remedies here leave the model unchanged at prediction time:
- "weights": each example's loss is weighed by n / (K * n_c), so every painter carries the same total weight
  and the mean weight over the training set stays 1 (the learning rate keeps its meaning);
- "logit_adjust": the loss sees logits + log(prior) (Menon et al., "Long-tail learning via logit adjustment",
  2021): the model learns scores from which the prior has been taken out, i.e. a balanced classifier.
"""

from __future__ import annotations

import numpy as np


def class_weights(counts: np.ndarray, mode: str) -> np.ndarray:
    """Per-painter loss weights for `mode`; ones unless mode is "weights"."""
    counts = np.asarray(counts, np.float64)
    if mode != "weights":
        return np.ones(len(counts), np.float32)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return weights.astype(np.float32)


def logit_offsets(counts: np.ndarray, mode: str) -> np.ndarray:
    """Per-painter additions to the logits inside the training loss; zeros unless mode is "logit_adjust"."""
    counts = np.asarray(counts, np.float64)
    if mode != "logit_adjust":
        return np.zeros(len(counts), np.float32)
    return np.log(np.maximum(counts, 1) / counts.sum()).astype(np.float32)
