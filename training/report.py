"""PNG plots for a run: training curves, confusion matrix, a grid of sample predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils import pyplot, save_figure


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    cm = np.asarray(cm)
    k = len(classes)
    size = min(4 + 0.45 * k, 24)
    fig, ax = pyplot().subplots(figsize=(size, size * 0.85))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=60, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_figure(fig, path)


def plot_samples(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                 path: Path, title: str, n: int = 24) -> None:
    """Grid of images with true and predicted labels (wrong ones in red)."""
    n = min(n, len(images))
    cols = 8
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ok = y_true[i] == y_pred[i]
            ax.set_title(f"{classes[y_true[i]][:12]}\n→ {classes[y_pred[i]][:12]}", fontsize=7,
                         color="black" if ok else "red")
    fig.suptitle(title)
    save_figure(fig, path)
