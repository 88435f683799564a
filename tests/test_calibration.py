"""Temperature scaling and the unknown-painter threshold, on logits whose true calibration is known."""

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
        assert (confidences < threshold).mean() == rate  # exactly the least confident share
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
