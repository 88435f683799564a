"""PNG figures people would rather see than read. Matplotlib with the Agg backend, so it works headless."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from artnet.data import storage  # noqa: E402


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def image_grid(images: np.ndarray, titles: list[str], uri: str, columns: int = 4) -> None:
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.5, rows * 2.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    _save(fig, uri)


FULL_MATRIX_MAX = 60  # painters; beyond, the PNG shows the largest confusions (the CSV has the whole matrix)
TOP_CONFUSIONS = 40


def confusion_matrix(cm: np.ndarray, names: list[str], uri: str, title: str = "") -> None:
    """Row-normalised confusion matrix (recall on the diagonal), counts in the cells when they fit. With more
    than FULL_MATRIX_MAX painters a matrix is unreadable (and its figure grows with the square of the count):
    the largest confusions instead, in a figure of fixed size."""
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    if len(names) > FULL_MATRIX_MAX:
        top_confusions(cm, norm, names, uri, title)
        return
    side = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted painter")
    ax.set_ylabel("true painter")
    if len(names) <= 15:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true painter's images")
    ax.set_title(title or f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})")
    _save(fig, uri)


def top_confusions(cm: np.ndarray, norm: np.ndarray, names: list[str], uri: str, title: str = "") -> None:
    """The TOP_CONFUSIONS largest off-diagonal shares: "true -> predicted", share of the true painter's images."""
    off = norm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None)[:TOP_CONFUSIONS]
    pairs = [divmod(int(k), len(names)) for k in flat if off.flat[k] > 0]
    fig, ax = plt.subplots(figsize=(9, 0.25 * max(len(pairs), 4) + 1.5))
    ax.barh(range(len(pairs)), [off[i, j] for i, j in pairs], color="tab:blue")
    ax.set_yticks(range(len(pairs)), [f"{names[i]} -> {names[j]} ({int(cm[i, j])})" for i, j in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the true painter's images")
    ax.set_title(title or f"largest confusions of {len(names)} painters (accuracy "
                          f"{np.trace(cm) / max(cm.sum(), 1):.3f}; full matrix in confusion_matrix.csv)")
    _save(fig, uri)


def confusion_csv(cm: np.ndarray, names: list[str], uri: str) -> None:
    """The whole matrix as counts: rows true painters, columns predicted, at any size."""
    import csv

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["true \\ predicted", *names])
    writer.writerows([name, *map(int, row)] for name, row in zip(names, cm))
    storage.write_bytes(uri, text.getvalue().encode())


def training_curves(history: list[dict], uri: str) -> None:
    """Loss and accuracy per epoch, train vs validation, with the phase switch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((left, "loss", "loss"), (right, "accuracy", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", label="validation")
        switch = next((h["epoch"] for h in history if h["phase"] == 2), None)
        if switch is not None and switch != epochs[0]:
            ax.axvline(switch - 0.5, color="grey", linestyle="--", label="blocks unfrozen")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    _save(fig, uri)


def sweep_curve(rows: list[dict], uri: str) -> None:
    """Test accuracy (and balanced accuracy) against the number of painters, per model kind of a sweep."""
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["painters"] for r in rows]
    series = (("head_test_accuracy", "head on features: accuracy", "-o"),
              ("head_test_balanced_accuracy", "head on features: balanced", "--o"),
              ("finetuned_test_accuracy", "fine-tuned: accuracy", "-s"),
              ("finetuned_test_balanced_accuracy", "fine-tuned: balanced", "--s"))
    for key, label, style in series:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(counts, [np.nan if v is None else v for v in values], style, label=label)
    ax.plot(counts, [1 / c for c in counts], ":", color="grey", label="chance (1 / painters)")
    ax.set_xlabel("painters")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, uri)
