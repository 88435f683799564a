"""Temperature scaling and the unknown-painter threshold, on logits whose true calibration is known."""

import threading

import numpy as np

from artnet.model import calibration as calib


def sampled(n: int, classes: int, sharpness: float, seed: int = 0):
    """Labels drawn from softmax(true_logits), and the model's logits = true logits x `sharpness`:
    above 1 the model is over-confident, below 1 under-confident; the right temperature is `sharpness`."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2.0, (n, classes))
    p = np.exp(true_logits - true_logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return true_logits * sharpness, labels


def test_temperature_undoes_over_and_under_confidence():
    for sharpness in (3.0, 0.5):
        logits, labels = sampled(4000, 5, sharpness)
        t = calib.fit_temperature(logits, labels)
        assert abs(t - sharpness) / sharpness < 0.1, (sharpness, t)
        fitted = calib.calibrate(logits, labels, false_flag_rate=0.1)
        assert fitted.val_nll_after < fitted.val_nll_before - 0.01
        assert fitted.val_ece_after < fitted.val_ece_before
        assert fitted.val_ece_after < 0.03


def test_scaling_never_changes_the_answer():
    logits, labels = sampled(500, 7, 3.0)
    fitted = calib.calibrate(logits, labels, false_flag_rate=0.1)
    assert (fitted.probabilities(logits).argmax(1) == logits.argmax(1)).all()


def test_a_perfect_validation_split_does_not_push_the_temperature_to_zero():
    labels = np.arange(60) % 3
    logits = np.eye(3)[labels] * 8.0  # always right
    assert calib.fit_temperature(logits, labels) >= 0.25 - 1e-6


def test_threshold_flags_the_stated_share_of_known_paintings():
    rng = np.random.default_rng(1)
    confidences = rng.uniform(0.2, 1.0, 1000)
    for rate in (0.05, 0.1, 0.3):
        threshold = calib.unknown_threshold(confidences, rate)
        assert rate - 0.002 <= (confidences < threshold).mean() <= rate  # the least confident share, at most
    assert calib.unknown_threshold(confidences, 0.0) == 0.0  # flag nothing


def test_unknown_flags_low_confidence_rows():
    fitted = calib.Calibration(temperature=1.0, threshold=0.6)
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45]])
    assert fitted.unknown(probabilities).tolist() == [False, True]


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    labels = np.array([0, 0, 0, 1] * 25)
    honest = np.tile([0.75, 0.25], (100, 1))  # says 75%, right 75% of the time
    assert calib.expected_calibration_error(honest, labels) < 1e-9
    boastful = np.tile([0.99, 0.01], (100, 1))
    assert abs(calib.expected_calibration_error(boastful, labels) - 0.24) < 1e-9


class WorkerSum:
    """What the training workers' all-reduce does, for shares held by threads: every call sums the vector each
    worker passed to its own call (every worker must call equally often)."""

    def __init__(self, workers: int):
        self.barrier, self.parts = threading.Barrier(workers), {}

    def of(self, rank: int):
        def total(values):
            self.parts[rank] = np.asarray(values, np.float64)
            self.barrier.wait()
            out = sum(self.parts[r] for r in sorted(self.parts))
            self.barrier.wait()  # everyone has read this round before the next one writes
            return out

        return total


def test_workers_holding_shares_fit_what_one_process_fits_on_the_whole_split():
    logits, labels = sampled(3000, 6, 3.0)
    shares = [(logits[r::3], labels[r::3]) for r in range(3)] + [(logits[:0], labels[:0])]  # one worker got none
    summed, fits = WorkerSum(len(shares)), [None] * len(shares)

    def work(rank):
        share_logits, share_labels = shares[rank]
        fitted = calib.calibrate(share_logits, share_labels, 0.1, total=summed.of(rank))
        ece = calib.expected_calibration_error(fitted.probabilities(share_logits), share_labels, total=summed.of(rank))
        fits[rank] = (fitted, ece)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    alone = calib.calibrate(logits, labels, 0.1)
    alone_ece = calib.expected_calibration_error(alone.probabilities(logits), labels)
    for fitted, ece in fits:
        assert fitted.temperature == alone.temperature and fitted.threshold == alone.threshold
        for name in ("val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after"):
            assert abs(getattr(fitted, name) - getattr(alone, name)) < 1e-12, name
        assert abs(ece - alone_ece) < 1e-12
