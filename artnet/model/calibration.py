"""Calibrated confidence and "unknown painter" (numpy only).

A fine-tuned network is over-confident: its top probability says 0.95 where it is right 80% of the time.
Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on the validation split by
minimising its negative log-likelihood; it changes no prediction, only the probabilities. The "unknown painter"
threshold is then the confidence below which a stated share (`false_flag_rate`) of known painters' validation
paintings falls: paintings by painters the model never saw tend to get lower top probabilities, and are reported
as "unknown (closest: X)".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from artnet import metrics


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true painters at a temperature."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.25, high: float = 20.0) -> float:
    """The T in [low, high] that minimises validation NLL: golden-section search on log T (NLL is convex in 1/T,
    and unimodal in log T). A validation split the model gets entirely right pushes T towards 0 (ever sharper
    is ever better there): `low` stops that from turning every answer into certainty."""
    ratio = (np.sqrt(5) - 1) / 2
    a, b = np.log(low), np.log(high)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins weighted by
    their share of images."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(total)


def unknown_threshold(confidences: np.ndarray, false_flag_rate: float) -> float:
    """The confidence below which at most `false_flag_rate` of these (known painters') paintings fall."""
    if false_flag_rate <= 0 or len(confidences) == 0:
        return 0.0
    ordered = np.sort(confidences)
    k = int(np.floor(false_flag_rate * len(ordered)))  # flag exactly the k least confident
    return float(ordered[k]) if k < len(ordered) else float(ordered[-1]) + 1e-12


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


def calibrate(logits: np.ndarray, labels: np.ndarray, false_flag_rate: float) -> Calibration:
    """Fit the temperature and the unknown-painter threshold on validation logits of known painters."""
    temperature = fit_temperature(logits, labels)
    before, after = metrics.softmax(logits), metrics.softmax(np.asarray(logits, np.float64) / temperature)
    return Calibration(temperature=temperature, threshold=unknown_threshold(after.max(axis=1), false_flag_rate),
                       false_flag_rate=false_flag_rate,
                       val_nll_before=nll(logits, labels), val_nll_after=nll(logits, labels, temperature),
                       val_ece_before=expected_calibration_error(before, labels),
                       val_ece_after=expected_calibration_error(after, labels))
