"""Metric math for evaluate.py: top-k accuracy, calibration (reliability bins, ECE), confident errors.

Plain functions on tensors, no I/O. Top-1 accuracy alone hides how sure a model is when it is
wrong; the calibration numbers say whether "90% confident" means right 90% of the time.
"""
from __future__ import annotations

import torch

ECE_BINS = 15  # equal-width confidence bins on [0, 1], as in Guo et al. (2017), "On Calibration of Modern NNs"


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share (%) of images whose true class is among the k highest scores; k=1 is top-1 accuracy."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(1)
    return 100.0 * hits.double().mean().item()


def top_k_classes(probs: torch.Tensor, classes: tuple[str, ...], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row of probabilities, its k most likely classes with their probabilities, best first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), values.tolist(), strict=True)]


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> list[dict]:
    """Images grouped by confidence (the top probability) into `n_bins` equal-width bins on (0, 1].

    Each bin: its edges, how many images fell in it, their mean confidence and their accuracy (both
    as fractions; 0 for an empty bin). A calibrated model has accuracy == confidence in every bin."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # bin b holds confidences in (b/n, (b+1)/n]; the top probability of k classes is at least 1/k > 0
    index = (confidence.double() * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    safe = count.clamp(min=1)
    return [{"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(count[b]),
             "confidence": float(conf_sum[b] / safe[b]), "accuracy": float(correct_sum[b] / safe[b])}
            for b in range(n_bins)]


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE as a fraction: the gap |accuracy - confidence| of each bin, weighted by its share of images."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / max(total, 1)


def most_confident_errors(probs: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of up to n misclassified images, the most confident (highest top probability) first.

    These are the mistakes worth looking at: label noise, look-alike classes, or a model that is sure
    of the wrong thing."""
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order[:n]]
