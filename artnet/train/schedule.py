"""Schedule decisions as pure functions of sizes and counters (no framework imports), after big_transfer's
hyperrule: learning-rate scaling, warm-up + cosine, phases, steps per epoch, early stopping."""

from __future__ import annotations

import math

REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: `base_lr` is the rate for a global batch of 256."""
    return base_lr * global_batch / REFERENCE_BATCH


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total_steps` (steps counted within a phase)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def phase_of(epoch: int, head_epochs: int) -> int:
    """1 = head only on a frozen backbone, 2 = top blocks unfrozen."""
    return 1 if epoch < head_epochs else 2


def steps_per_epoch(train_rows: int, workers: int, per_worker_batch: int) -> int:
    """Steps every worker runs: rows are split equally across workers and partial batches dropped."""
    return (train_rows // workers) // per_worker_batch


def should_stop(val_losses: list[float], patience: int, min_delta: float = 1e-4) -> bool:
    """True when the last `patience` epochs brought no improvement over the best loss before them."""
    if patience <= 0 or len(val_losses) <= patience:
        return False
    best_before = min(val_losses[:-patience])
    return min(val_losses[-patience:]) > best_before - min_delta
