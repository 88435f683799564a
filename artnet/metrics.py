"""Classification metrics from a confusion matrix and logits (numpy only): accuracy, top-k, per-painter
precision/recall/F1, macro-F1 and balanced accuracy (mean per-painter recall: on an unbalanced collection,
accuracy alone hides a model that ignores the small painters)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true painters, columns predicted painters."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def top_k_correct(labels: np.ndarray, logits: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def summarize(cm: np.ndarray, top3: int, loss_sum: float) -> dict[str, float]:
    n = int(cm.sum())
    stats = per_class(cm)
    present = stats["support"] > 0
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": float(np.trace(cm) / max(n, 1)),
        "top3_accuracy": top3 / max(n, 1),
        "macro_f1": float(stats["f1"][present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(stats["recall"][present].mean()) if present.any() else 0.0,
        "images": n,
    }


def tally(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> tuple[np.ndarray, int, float]:
    """(confusion matrix, top-3 hits, summed cross-entropy) of one batch; sums over batches give a split's."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss_sum = float(-log_probs[np.arange(len(labels)), labels].sum())
    return confusion(labels, logits.argmax(axis=1), num_classes), top_k_correct(labels, logits, 3), loss_sum


def evaluate_logits(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """Metrics (mean cross-entropy loss included) and confusion matrix for one array of logits."""
    cm, top3, loss_sum = tally(labels, logits, num_classes)
    return summarize(cm, top3, loss_sum), cm
