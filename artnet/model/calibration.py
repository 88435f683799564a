"""Calibrated confidence and "unknown painter" (numpy only).

A fine-tuned network is over-confident: its top probability says 0.95 where it is right 80% of the time.
Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on the validation split by
minimising its negative log-likelihood; it changes no prediction, only the probabilities. The "unknown painter"
threshold is then the confidence below which a stated share (`false_flag_rate`) of known painters' validation
paintings falls: paintings by painters the model never saw tend to get lower top probabilities, and are reported
as "unknown (closest: X)".

Every fit takes `total`, which sums a statistics vector over the training workers (identity on one machine):
each worker holds only its share of the split, and what is summed is fixed-size (NLL at a few temperatures,
confidence histograms), so one process and sixteen workers compute the same numbers, and nothing grows with
the split except each worker's own pass over its share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from artnet import metrics


Total = Callable[[np.ndarray], np.ndarray]
GRID, ROUNDS = 16, 5  # temperatures per round, rounds: log T to within 2e-4 over [0.25, 20] (80 NLL passes)
THRESHOLD_BINS = 2**16  # confidence resolution of the unknown threshold
ECE_BINS = 15


def _alone(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float64)


def _nll_sum(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Summed negative log-likelihood of the true painters at a temperature (0 for an empty share)."""
    if len(labels) == 0:
        return 0.0
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.25, high: float = 20.0,
                    total: Total = _alone) -> float:
    """The T in [low, high] that minimises validation NLL (unimodal in log T): NLL summed over all workers at
    GRID temperatures, the bracket around the best narrowed ROUNDS times. A validation split the model gets
    entirely right pushes T towards 0 (ever sharper is ever better there): `low` stops that from turning every
    answer into certainty."""
    grid = np.linspace(np.log(low), np.log(high), GRID)
    for _ in range(ROUNDS):
        sums = total(np.array([_nll_sum(logits, labels, np.exp(v)) for v in grid]))
        best = int(np.argmin(sums))
        narrowed = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, GRID - 1)], GRID)
        grid, best_log_t = narrowed, grid[best]
    return float(np.exp(best_log_t))


def _histogram(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> np.ndarray:
    """Per equal-width confidence bin: (images, summed confidence, correct answers), concatenated."""
    out = np.zeros(3 * bins)
    if len(labels):
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
        which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True), 0, bins - 1)
        for part, weights in enumerate((None, confidence, correct.astype(np.float64))):
            out[part * bins:(part + 1) * bins] = np.bincount(which, weights=weights, minlength=bins)
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS,
                               total: Total = _alone) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins weighted by
    their share of images."""
    count, confidence, correct = total(_histogram(probabilities, labels, bins)).reshape(3, bins)
    seen = count > 0
    return float(np.abs(confidence[seen] - correct[seen]).sum() / max(count.sum(), 1))


def unknown_threshold(confidences: np.ndarray, false_flag_rate: float, total: Total = _alone) -> float:
    """The confidence below which at most `false_flag_rate` of these (known painters') paintings fall, to
    1/THRESHOLD_BINS (a histogram of confidences is what workers can sum)."""
    if false_flag_rate <= 0:
        return 0.0
    which = np.minimum((np.asarray(confidences) * THRESHOLD_BINS).astype(np.int64), THRESHOLD_BINS - 1)
    counts = total(np.bincount(which, minlength=THRESHOLD_BINS).astype(np.float64))
    below = np.concatenate([[0.0], np.cumsum(counts)])  # below[j]: confidences under j / THRESHOLD_BINS
    allowed = np.floor(false_flag_rate * below[-1])
    return float(np.flatnonzero(below <= allowed)[-1] / THRESHOLD_BINS)


@dataclass(frozen=True)
class Calibration:
    """What a model carries to answer with calibrated probabilities and an "unknown" flag."""

    temperature: float = 1.0
    threshold: float = 0.0  # calibrated top probability below which a painting is "unknown"
    false_flag_rate: float = 0.0  # share of known painters' validation paintings the threshold flags
    val_nll_before: float = float("nan")
    val_nll_after: float = float("nan")
    val_ece_before: float = float("nan")
    val_ece_after: float = float("nan")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return metrics.softmax(np.asarray(logits, np.float64) / self.temperature)

    def unknown(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities.max(axis=1) < self.threshold

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def calibrate(logits: np.ndarray, labels: np.ndarray, false_flag_rate: float, total: Total = _alone) -> Calibration:
    """Fit the temperature and the unknown-painter threshold on validation logits of known painters (this
    worker's share of them, with `total` summing over all workers)."""
    temperature = fit_temperature(logits, labels, total=total)
    before, after = metrics.softmax(logits), metrics.softmax(np.asarray(logits, np.float64) / temperature)
    images, nll_before, nll_after = total(np.array([len(labels), _nll_sum(logits, labels, 1.0),
                                                    _nll_sum(logits, labels, temperature)]))
    return Calibration(temperature=temperature,
                       threshold=unknown_threshold(after.max(axis=1), false_flag_rate, total),
                       false_flag_rate=false_flag_rate,
                       val_nll_before=float(nll_before / images), val_nll_after=float(nll_after / images),
                       val_ece_before=expected_calibration_error(before, labels, total=total),
                       val_ece_after=expected_calibration_error(after, labels, total=total))
