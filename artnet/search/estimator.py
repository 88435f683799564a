"""A scikit-learn classifier over cached backbone features (the study planned a `KerasClassifier` analysis).

`HeadClassifier` trains artnet's own head (`search.heads.fit_head`) with the head config as estimator
params, so it works in `cross_val_score`, `GridSearchCV` and `Pipeline`. With `head_depth=0` it is
multinomial logistic regression on the features: the accuracy benchmark's "frozen features + logistic
regression" baseline.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from artnet import metrics
from artnet.config import ModelConfig, TrainConfig


class HeadClassifier(ClassifierMixin, BaseEstimator):
    """Dense head (depth x width, halving, dropout, ReLU) + softmax, trained with Adam on feature rows."""

    def __init__(self, head_depth: int = 1, head_width: int = 256, head_halving: bool = True, dropout: float = 0.3,
                 lr: float = 1e-2, epochs: int = 30, label_smoothing: float = 0.0, class_balance: str = "none",
                 batch_size: int = 256, random_state: int = 0):
        self.head_depth = head_depth
        self.head_width = head_width
        self.head_halving = head_halving
        self.dropout = dropout
        self.lr = lr
        self.epochs = epochs
        self.label_smoothing = label_smoothing
        self.class_balance = class_balance
        self.batch_size = batch_size
        self.random_state = random_state

    def configs(self) -> tuple[ModelConfig, TrainConfig]:
        """The params as artnet's config sections (validated: a bad param names the field and the fix)."""
        model = ModelConfig(backbone="tiny", weights="none", head_depth=self.head_depth, head_width=self.head_width,
                            head_halving=self.head_halving, dropout=self.dropout)
        train = TrainConfig(lr=self.lr, label_smoothing=self.label_smoothing, class_balance=self.class_balance,
                            seed=self.random_state, patience=0, warmup_epochs=0.0)
        model.validate()
        train.validate()
        return model, train

    def fit(self, X, y):
        from artnet.search.heads import Features, fit_head

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"HeadClassifier needs samples of at least 2 classes; got 1 class ({self.classes_[0]!r})")
        model_cfg, train_cfg = self.configs()
        self.head_ = fit_head(Features(X, labels.astype(np.int64)), len(self.classes_), model_cfg, train_cfg,
                              self.epochs, batch_size=self.batch_size).model
        return self

    def _logits(self, X) -> np.ndarray:
        from artnet.search.heads import logits_of

        check_is_fitted(self)
        return logits_of(self.head_, validate_data(self, X, dtype=np.float32, reset=False))

    def decision_function(self, X) -> np.ndarray:
        """Logits; for two classes, scikit-learn's 1-D score of the second class."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    def predict_proba(self, X) -> np.ndarray:
        return metrics.softmax(self._logits(X))

    def predict(self, X) -> np.ndarray:
        logits = self._logits(X)  # checks that the estimator is fitted
        return self.classes_[np.argmax(logits, axis=1)]


def from_job(job) -> HeadClassifier:
    """The estimator with a job's head and training settings (its search.epochs as the epoch count)."""
    return HeadClassifier(head_depth=job.model.head_depth, head_width=job.model.head_width,
                          head_halving=job.model.head_halving, dropout=job.model.dropout, lr=job.train.lr,
                          epochs=job.search.epochs, label_smoothing=job.train.label_smoothing,
                          class_balance=job.train.class_balance, random_state=job.train.seed)
