"""Evaluate a checkpoint on the CIFAR-10 test set: accuracy, loss, per-class accuracy, plots, report.

    python evaluate.py model/learn_rate_consistent_model.pth
    python evaluate.py model/learn_rate_consistent_model.pth --data-dir /tmp/cifar10 --out-dir eval/run1

The model is rebuilt from the checkpoint alone (its config names the architecture). Written to
--out-dir: confusion_matrix.png, per_class_accuracy.png, loss_curve.png and accuracy_curve.png
(from the training history in the checkpoint), and report.json with every number printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import plots
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from data import CLASSES, DataError, load_cifar10, make_eval_loader
from runtime import autocast, pick_device


def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def forward(model: nn.Module, x: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
    """Logits (float32); with `tta`, the mean of the logits of the images and their mirror images."""
    logits = model(x).float()
    return (logits + model(x.flip(3)).float()) / 2 if tta else logits


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, channels_last: bool = False,
             tta: bool = False, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Mean cross-entropy and top-1 accuracy (%) over a loader; `reduce` sums the totals across ranks."""
    model.eval()
    sums = torch.zeros(3, device=device)  # loss sum, correct, images; kept on the device: no per-batch sync
    for x, y in loader:
        x, y = _prepare(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = forward(model, x, tta=tta)
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    loss_sum, correct, n = reduce(sums).tolist()
    return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1), "n": int(n)}


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device, *, amp: bool = False, channels_last: bool = False,
            tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for every image, one batch in memory at a time."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in loader:
        with autocast(device, amp):
            logits = forward(model, _prepare(x, device, channels_last), tta=tta)
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """Loss, top-1 accuracy, per-class accuracy (%) and the confusion matrix (rows: true class)."""
    k = len(classes)
    preds = logits.argmax(1)
    cm = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()
    per_class = 100.0 * np.diag(cm) / np.maximum(cm.sum(1), 1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": 100.0 * (preds == labels).float().mean().item(),
        "n": len(labels),
        "per_class_accuracy": dict(zip(classes, per_class.round(2).tolist(), strict=True)),
        "confusion_matrix": cm.tolist(),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a ResNet9 checkpoint on the CIFAR-10 test set.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (downloaded if absent)")
    p.add_argument("--out-dir", default=None, help="where plots and report.json go (default: eval/<checkpoint name>)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    device = pick_device(args.device)
    out_dir = Path(args.out_dir or Path("eval") / Path(args.checkpoint).stem)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_cifar10(args.data_dir)
    loader = make_eval_loader(data.test_images, data.test_labels, args.batch_size, workers=0, device=device,
                              on_device=True)
    start = time.perf_counter()
    logits, labels = predict(model.to(device), loader, device)
    seconds = time.perf_counter() - start
    report = classification_report(logits, labels, CLASSES)
    report.update(checkpoint=str(args.checkpoint), epoch=ckpt.get("epoch"), seconds=round(seconds, 2),
                  device=str(device), torch=str(torch.__version__))

    print(f"{args.checkpoint}: {report['n']} test images in {seconds:.1f}s on {device}")
    print(f"test loss {report['loss']:.4f}   top-1 accuracy {report['accuracy']:.2f}%")
    for name, acc in report["per_class_accuracy"].items():
        print(f"  {name:<10} {acc:6.2f}%")

    written = [plots.save_confusion_matrix(np.array(report["confusion_matrix"]), CLASSES,
                                           out_dir / "confusion_matrix.png"),
               plots.save_per_class_accuracy(list(report["per_class_accuracy"].values()), CLASSES,
                                             out_dir / "per_class_accuracy.png", report["accuracy"])]
    history = ckpt.get("history")
    if isinstance(history, list) and history:
        eval_name = "val" if ckpt.get("config", {}).get("val_size", 1) else "test"
        written += plots.save_curves(history, out_dir, eval_name)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    written.append(report_path)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
