"""Figures for people to look at: training curves, confusion matrix, per-class accuracy.

Drawn on matplotlib `Figure` objects with the Agg canvas, so nothing needs a display and no
global backend is switched at import.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    return path


def save_curves(history: Sequence[dict], out_dir: str | os.PathLike, eval_name: str = "val") -> list[Path]:
    """`loss_curve.png` and `accuracy_curve.png`: training and selection-split curves per epoch."""
    out_dir = Path(out_dir)
    epochs = [h["epoch"] for h in history]
    paths = []
    for metric, label, name in (("loss", "cross-entropy loss", "loss_curve.png"),
                                ("acc", "top-1 accuracy (%)", "accuracy_curve.png")):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], marker=".", label="train (augmented)")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], marker=".", label=eval_name)
        best = [h["epoch"] for h in history if h.get("improved")]
        if metric == "acc" and best:
            ax.axvline(best[-1], color="grey", linestyle=":", label=f"best {eval_name} (epoch {best[-1]})")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label.split(' (')[0]} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / name))
    return paths


def save_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike,
                          normalize: bool = True) -> Path:
    """Rows are true classes, columns predictions; normalised per true class (row) by default."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(shown[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.5 * shown.max() else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (row-normalised)" if normalize else ""))
    return _save(fig, Path(path))


def save_per_class_accuracy(acc: Sequence[float], classes: Sequence[str], path: str | os.PathLike,
                            overall: float | None = None) -> Path:
    """A bar per class (accuracy in %), with the overall accuracy as a line."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bars = ax.bar(classes, acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if overall is not None:
        ax.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.2f}%")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 105)
    ax.set(ylabel="accuracy (%)", title="test accuracy per class")
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, Path(path))
