"""Figures for people to look at: training curves, confusion matrix, per-class accuracy, calibration,
robustness, the most confident mistakes, and one summary page with most of them.

Drawn on matplotlib `Figure` objects with the Agg canvas, so nothing needs a display and no
global backend is switched at import. Each panel has a `draw_*(ax, ...)` function, used both by
its own `save_*` figure and by the summary page, so the two always agree.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from files.writes import replaced


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG through a temporary file; a failed write raises writes.WriteError."""
    fig.tight_layout()
    with replaced(path, "the figure") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def _note(ax: Axes, text: str, title: str) -> None:
    """An empty panel that says why it is empty, so the summary's layout never shifts."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, color="grey")
    ax.set(title=title, xticks=[], yticks=[])


# ----------------------------------------------------------------------------- panels

_CURVES = {"loss": ("cross-entropy loss", "loss_curve.png"), "acc": ("top-1 accuracy (%)", "accuracy_curve.png")}


def _selection_points(history: Sequence[dict], key: str) -> tuple[list, list]:
    """Epochs and values of `key` where the selection split was evaluated (train.py --eval-every skips some)."""
    rows = [h for h in history if h[key] is not None]
    return [h["epoch"] for h in rows], [h[key] for h in rows]


def draw_curve(ax: Axes, history: Sequence[dict], metric: str, eval_name: str = "val") -> None:
    """Training and selection-split `metric` ("loss" or "acc") per epoch; the best epoch marked."""
    label = _CURVES[metric][0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h[f"train_{metric}"] for h in history], marker=".", label="train (augmented)")
    ax.plot(*_selection_points(history, f"val_{metric}"), marker=".", label=eval_name)
    best = [h["epoch"] for h in history if h.get("improved")]
    if metric == "acc" and best:
        ax.axvline(best[-1], color="grey", linestyle=":", label=f"best {eval_name} (epoch {best[-1]})")
    ax.set(xlabel="epoch", ylabel=label, title=f"{label.split(' (')[0]} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.grid(alpha=0.3)
    ax.legend()


def draw_confusion_matrix(ax: Axes, cm: np.ndarray, classes: Sequence[str], normalize: bool = True):
    """Rows are true classes, columns predictions; returns the image, for a colour bar."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(shown[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.5 * shown.max() else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (row-normalised)" if normalize else ""))
    return im


def draw_per_class_accuracy(ax: Axes, acc: Sequence[float], classes: Sequence[str],
                            overall: float | None = None) -> None:
    """A bar per class (accuracy in %), with the overall accuracy as a line."""
    bars = ax.bar(classes, acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if overall is not None:
        ax.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.2f}%")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 105)
    ax.set(ylabel="accuracy (%)", title="test accuracy per class")
    ax.tick_params(axis="x", rotation=45)


def draw_reliability(ax: Axes, bins: Sequence[Mapping], ece: float) -> None:
    """Accuracy against confidence per bin (bins as in metrics.reliability_bins, drawn in %): bars
    below the diagonal are overconfidence, above it underconfidence. The grey line, on the right
    axis, is the share of images in each bin, so a big gap in an almost empty bin is not misread."""
    lower = np.array([b["lower"] for b in bins]) * 100
    width = np.array([b["upper"] - b["lower"] for b in bins]) * 100
    count = np.array([b["count"] for b in bins])
    acc, conf = (np.array([b[k] for b in bins]) * 100 for k in ("accuracy", "confidence"))
    filled = count > 0
    ax.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="tab:blue", alpha=0.8,
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar(lower[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled], align="edge",
           color="none", edgecolor="tab:red", hatch="///", linewidth=0.5, label="gap to mean confidence")
    ax.plot([0, 100], [0, 100], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    share = ax.twinx()
    share.plot(lower + width / 2, 100 * count / max(count.sum(), 1), color="dimgrey", marker=".", linewidth=1,
               label="images in bin")
    share.set(ylim=(0, 100), ylabel="images in bin (%)")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="confidence (%)", ylabel="accuracy (%)",
           title=f"reliability diagram (ECE {ece:.2f}%, {len(bins)} bins)")
    handles = [h for a in (ax, share) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left", fontsize=8)


def draw_robustness(ax: Axes, clean: float, accuracy: Mapping[str, Sequence[float]]) -> None:
    """Top-1 accuracy (%) against severity, one line per corruption, the clean accuracy at severity 0."""
    for name, values in accuracy.items():
        ax.plot(range(len(values) + 1), [clean, *values], marker="o", label=name.replace("_", " "))
    ax.set_xticks(range(max(len(v) for v in accuracy.values()) + 1))
    ax.set(xlabel="severity (0 = clean)", ylabel="top-1 accuracy (%)", title="accuracy under corruption",
           ylim=(0, max(100.0, clean + 5)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- figures

def save_curves(history: Sequence[dict], out_dir: str | os.PathLike, eval_name: str = "val") -> list[Path]:
    """`loss_curve.png` and `accuracy_curve.png`: training and selection-split curves per epoch."""
    paths = []
    for metric, (_, name) in _CURVES.items():
        fig = Figure(figsize=(6, 4))
        draw_curve(fig.subplots(), history, metric, eval_name)
        paths.append(save_figure(fig, Path(out_dir) / name))
    return paths


def save_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike,
                          normalize: bool = True) -> Path:
    """Rows are true classes, columns predictions; normalised per true class (row) by default."""
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    fig.colorbar(draw_confusion_matrix(ax, cm, classes, normalize), ax=ax, fraction=0.046)
    return save_figure(fig, Path(path))


def save_per_class_accuracy(acc: Sequence[float], classes: Sequence[str], path: str | os.PathLike,
                            overall: float | None = None) -> Path:
    """A bar per class (accuracy in %), with the overall accuracy as a line."""
    fig = Figure(figsize=(7, 4))
    draw_per_class_accuracy(fig.subplots(), acc, classes, overall)
    return save_figure(fig, Path(path))


def save_reliability_diagram(bins: Sequence[Mapping], ece: float, path: str | os.PathLike) -> Path:
    """The reliability diagram of `draw_reliability` on its own."""
    fig = Figure(figsize=(6, 5))
    draw_reliability(fig.subplots(), bins, ece)
    return save_figure(fig, Path(path))


def save_robustness(clean: float, accuracy: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """The accuracy-against-severity plot of `draw_robustness` on its own."""
    fig = Figure(figsize=(6, 4.5))
    draw_robustness(fig.subplots(), clean, accuracy)
    return save_figure(fig, Path(path))


def save_image_grid(images: np.ndarray, captions: Sequence[str], path: str | os.PathLike, title: str,
                    cols: int = 8) -> Path:
    """uint8 N x H x W x 3 images in a grid, each with its caption (a few short lines) above it."""
    rows = max(1, -(-len(images) // cols))
    fig = Figure(figsize=(1.6 * cols, 2.0 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    if not len(images):
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title)
    return save_figure(fig, Path(path))


def save_summary(path: str | os.PathLike, *, history: Sequence[dict] | None, eval_name: str, cm: np.ndarray,
                 classes: Sequence[str], per_class: Sequence[float], overall: float, bins: Sequence[Mapping],
                 ece: float, robustness: Mapping[str, Sequence[float]] | None, title: str = "") -> Path:
    """One page: loss and accuracy curves, confusion matrix / per-class accuracy, reliability diagram,
    robustness. A missing part (no history, robustness skipped) leaves its panel with a note."""
    fig = Figure(figsize=(18, 11))
    axes = fig.subplots(2, 3)
    for ax, metric in zip(axes[0, :2], _CURVES, strict=True):
        if history:
            draw_curve(ax, history, metric, eval_name)
        else:
            _note(ax, "no usable training history in the checkpoint", f"{metric} per epoch")
    fig.colorbar(draw_confusion_matrix(axes[0, 2], cm, classes), ax=axes[0, 2], fraction=0.046)
    draw_per_class_accuracy(axes[1, 0], per_class, classes, overall)
    draw_reliability(axes[1, 1], bins, ece)
    if robustness:
        draw_robustness(axes[1, 2], overall, robustness)
    else:
        _note(axes[1, 2], "robustness not measured (--no-robustness)", "accuracy under corruption")
    fig.suptitle(title, fontsize=14)
    return save_figure(fig, Path(path))


def save_run_comparison(histories: Mapping[str, Sequence[dict]], path: str | os.PathLike,
                        eval_name: str = "val") -> Path:
    """Training and selection-split accuracy per epoch of several runs, one colour per run:
    solid lines train, dashed lines the selection split."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for i, (name, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_acc"] for h in history], color=f"C{i}", label=f"{name}: train")
        ax.plot(*_selection_points(history, "val_acc"), color=f"C{i}", linestyle="--", label=f"{name}: {eval_name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))
