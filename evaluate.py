"""Evaluate a checkpoint on the CIFAR-10 test set, or classify your own image files.

    python evaluate.py model/learn_rate_consistent_model.pth
    python evaluate.py model/learn_rate_consistent_model.pth --data-dir /tmp/cifar10 --out-dir eval/run1 --tta
    python evaluate.py model/learn_rate_consistent_model.pth --image cat.jpg dog.png

The model is rebuilt from the checkpoint alone (its config names the architecture); a .safetensors
file written by export.py works as well as a .pth (its metadata holds the config), and an .onnx file
of export.py (fp32 or --int8) is run with onnxruntime on the CPU, for the same report. On the test set
it prints and writes to --out-dir: loss, top-1/top-3 accuracy, per-class accuracy and the confusion
matrix, calibration (expected calibration error over 15 confidence bins, a reliability diagram),
horizontal-flip test-time augmentation (--tta), accuracy under five seeded corruptions at three
severities (reports/corruptions.py; off by default on the CPU, where it takes minutes), the most
confidently wrong test images, the training curves from the checkpoint's history, one summary page
(summary.png), and report.json with every number printed. Images are held as uint8 and normalised one batch at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from data import (
    CLASSES,
    META_FILE,
    TEST_FILE,
    DataError,
    ensure_cifar10,
    normalize_batch,
    read_batch,
    read_meta,
    to_device_images,
)
from deploy import onnx_model
from files.lock import FolderInUse, hold
from files.writes import WriteError, check_folder, replaced
from model import STANDARD_WIDTHS, build_model, count_parameters
from reports import corruptions, metrics, plots
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import OneLineParser
from training.evaluation import make_eval_loader, predict
from training.run_files import SELECTION_KEYS
from training.runtime import default_amp, pick_device

IMAGE_SIZE = 32  # pixels; the network's input side
ERRORS_SHOWN = 24  # the most confidently wrong test images drawn in confident_errors.png
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # what a curve needs per epoch
REPORT_ROOM = 2_000_000  # bytes free asked of --out-dir: its figures and report.json took 0.76 MB (1,000 images)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """Loss, top-1 accuracy, per-class accuracy (%) and the confusion matrix (rows: true class)."""
    k = len(classes)
    preds = logits.argmax(1)
    cm = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()
    per_class = 100.0 * np.diag(cm) / np.maximum(cm.sum(1), 1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": 100.0 * np.trace(cm).item() / max(len(labels), 1),  # the same count as the matrix's
        "n": len(labels),
        "per_class_accuracy": dict(zip(classes, per_class.round(2).tolist(), strict=True)),
        "confusion_matrix": cm.tolist(),
    }


# ----------------------------------------------------------------------------- the measurements

def calibration(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """ECE (%) and the reliability bins (edges, count, mean confidence and accuracy as fractions)."""
    bins = metrics.reliability_bins(probs, labels)
    return {"ece": 100 * metrics.expected_calibration_error(bins), "n_bins": len(bins), "bins": bins}


def channels_last(device: torch.device) -> bool:
    """Whether to run in channels-last layout: on 2 CPU cores it makes ResNet9 inference 1.3-2.7x
    faster (batches of 100-500, torch 2.14.1); MPS has had gaps in its channels-last support."""
    return device.type in ("cpu", "cuda")


def tta_report(model: nn.Module, loader, device: torch.device, plain_accuracy: float, amp: bool = False,
               shift: int = 0) -> dict:
    """Accuracy, loss and ECE with horizontal-flip averaging (and shifted views), and its gain over
    the plain accuracy."""
    logits, labels = predict(model, loader, device, amp=amp, tta=True, shift=shift,
                             channels_last=channels_last(device))
    accuracy = metrics.top_k_accuracy(logits, labels, 1)
    return {"accuracy": accuracy, "loss": F.cross_entropy(logits, labels).item(), "shift": shift,
            "ece": calibration(logits.softmax(1), labels)["ece"], "gain": accuracy - plain_accuracy}


def corrupted_batches(images: np.ndarray, labels: np.ndarray, name: str, severity: int, seed: int,
                      batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches of corrupted test images; each batch is corrupted as uint8 when it is needed."""
    rng = corruptions.corruption_rng(seed, name, severity)
    for i in range(0, len(images), batch_size):
        x = corruptions.corrupt(images[i:i + batch_size], name, severity, rng)
        yield normalize_batch(to_device_images(x, device)), torch.from_numpy(labels[i:i + batch_size])


def robustness(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, *,
               batch_size: int = 500, seed: int = 0, amp: bool = False) -> dict[str, list[float]]:
    """Top-1 accuracy (%, no TTA) under every corruption at severities 1..3, seeded by `seed`."""
    passes = [(name, s) for name, levels in corruptions.SEVERITIES.items() for s in range(1, len(levels) + 1)]
    accuracy: dict[str, list[float]] = {name: [] for name in corruptions.SEVERITIES}
    for name, severity in tqdm(passes, desc="robustness", unit="pass", leave=False, disable=None):
        batches = corrupted_batches(images, labels, name, severity, seed, batch_size, device)
        logits, y = predict(model, batches, device, amp=amp, channels_last=channels_last(device))
        accuracy[name].append(metrics.top_k_accuracy(logits, y, 1))
    return accuracy


def robustness_report(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                      batch_size: int, seed: int, amp: bool = False) -> dict:
    """The robustness accuracies with their mean per severity, the parameters, units and time taken."""
    start = time.perf_counter()
    accuracy = robustness(model, images, labels, device, batch_size=batch_size, seed=seed, amp=amp)
    return {"seed": seed, "accuracy": accuracy,
            "mean_accuracy": np.mean(list(accuracy.values()), axis=0).tolist(),
            "parameters": {k: list(v) for k, v in corruptions.SEVERITIES.items()},
            "parameter_units": corruptions.PARAMETER_UNITS, "seconds": round(time.perf_counter() - start, 2)}


def confident_errors(probs: torch.Tensor, labels: torch.Tensor, n: int = ERRORS_SHOWN) -> list[dict]:
    """The n most confidently wrong images: test-set index, true and predicted class, confidence (%)."""
    index = metrics.most_confident_errors(probs, labels, n)
    confidence, predicted = probs[index].max(1)
    return [{"index": i, "true": CLASSES[t], "predicted": CLASSES[p], "confidence": 100 * c}
            for i, t, p, c in zip(index.tolist(), labels[index].tolist(), predicted.tolist(), confidence.tolist(),
                                  strict=True)]


def plain_report(model: nn.Module, loader, device: torch.device, amp: bool = False) -> dict:
    """Loss, accuracies, per-class accuracy, confusion matrix, calibration and the confident errors."""
    start = time.perf_counter()
    logits, y = predict(model, loader, device, amp=amp, channels_last=channels_last(device))
    report = classification_report(logits, y, CLASSES)
    probs = logits.softmax(1)
    report.update(seconds=round(time.perf_counter() - start, 2), top3_accuracy=metrics.top_k_accuracy(logits, y, 3),
                  calibration=calibration(probs, y), confident_errors=confident_errors(probs, y))
    return report


def evaluate_test_set(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                      args: argparse.Namespace) -> dict:
    """Measure and print part by part, so the plain numbers show before the long robustness passes."""
    loader = make_eval_loader(images, labels, args.batch_size, workers=0, device=device, on_device=True)
    report = plain_report(model, loader, device, args.amp)
    print(f"{args.checkpoint}: {report['n']} test images in {report['seconds']:.1f}s on {device} ({args.amp_why})")
    print_plain(report)
    report["tta"] = (tta_report(model, loader, device, report["accuracy"], args.amp, args.tta_shift) if args.tta
                     else None)
    if report["tta"]:
        print_tta(report["tta"], report["accuracy"])
    report["robustness"] = None
    passes = sum(map(len, corruptions.SEVERITIES.values()))
    minutes = passes * report["seconds"] / 60
    if args.robustness is None and device.type == "cpu":  # auto: 15 passes are minutes on a GPU, a long wait here
        print(f"robustness: skipped on the CPU ({passes} more passes over the {report['n']} images, about "
              f"{minutes:.0f} min here); --robustness runs them, --limit N shortens them")
    elif args.robustness is not False:
        print(f"robustness: {passes} more passes over the {report['n']} images, about "
              f"{minutes:.1f} min here (--no-robustness skips them)")
        report["robustness"] = robustness_report(model, images, labels, device, args.batch_size, args.seed, args.amp)
        print_robustness(report["robustness"], report["accuracy"])
    return report


# ----------------------------------------------------------------------------- output

def print_plain(report: dict) -> None:
    print(f"test loss {report['loss']:.4f}   top-1 accuracy {report['accuracy']:.2f}%   "
          f"top-3 accuracy {report['top3_accuracy']:.2f}%")
    for name, acc in report["per_class_accuracy"].items():
        print(f"  {name:<10} {acc:6.2f}%")
    cal = report["calibration"]
    print(f"calibration: ECE {cal['ece']:.2f}% ({cal['n_bins']} equal-width confidence bins; 0 is perfect)")


def print_tta(tta: dict, plain_accuracy: float) -> None:
    views = (f"6 views: image and mirror image, as they are and moved by {tta['shift']} px both ways diagonally"
             if tta.get("shift") else "mean of image and mirror image")
    print(f"TTA ({views}): top-1 accuracy {tta['accuracy']:.2f}% "
          f"({tta['gain']:+.2f} points vs plain {plain_accuracy:.2f}%), ECE {tta['ece']:.2f}%")


def print_robustness(rob: dict, clean: float) -> None:
    print(f"robustness: top-1 accuracy (%) under corruption, seed {rob['seed']}, {rob['seconds']:.1f}s "
          f"(clean {clean:.2f}%)")
    print(f"  {'corruption':<16}{'sev 1':>8}{'sev 2':>8}{'sev 3':>8}   parameter at severities 1 / 2 / 3")
    for name, accs in rob["accuracy"].items():
        levels = " / ".join(f"{v:g}" for v in rob["parameters"][name])
        print(f"  {name:<16}" + "".join(f"{a:8.2f}" for a in accs) + f"   {rob['parameter_units'][name]}: {levels}")
    print(f"  {'mean':<16}" + "".join(f"{a:8.2f}" for a in rob["mean_accuracy"]))


def history_problem(history) -> str | None:
    """Why the checkpoint's history cannot be drawn, or None if it can."""
    if history is None:
        return "the checkpoint holds no training history"
    if not isinstance(history, list) or not history:
        return f"its history is not a non-empty list (got {type(history).__name__})"
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not all(
                is_number(row.get(k)) or (k in SELECTION_KEYS and k in row and row[k] is None) for k in HISTORY_KEYS):
            return f"history row {i} lacks a number for one of {', '.join(HISTORY_KEYS)}"
    return None


def save_figures(report: dict, ckpt: dict, images: np.ndarray, out_dir: Path) -> list[Path]:
    """Every figure of the report; the curves only if the checkpoint's history is usable."""
    per_class, cal, rob = list(report["per_class_accuracy"].values()), report["calibration"], report["robustness"]
    written = [plots.save_confusion_matrix(np.array(report["confusion_matrix"]), CLASSES,
                                           out_dir / "confusion_matrix.png"),
               plots.save_per_class_accuracy(per_class, CLASSES, out_dir / "per_class_accuracy.png",
                                             report["accuracy"]),
               plots.save_reliability_diagram(cal["bins"], cal["ece"], out_dir / "reliability_diagram.png"),
               save_error_grid(report["confident_errors"], images, out_dir / "confident_errors.png")]
    if rob:
        written.append(plots.save_robustness(report["accuracy"], rob["accuracy"], out_dir / "robustness.png"))
    history, problem = ckpt.get("history"), history_problem(ckpt.get("history"))
    eval_name = "val" if ckpt.get("config", {}).get("val_size", 1) else "test"
    if problem:
        print(f"note: no training curves: {problem}")
    else:
        written += plots.save_curves(history, out_dir, eval_name)
    written.append(plots.save_summary(
        out_dir / "summary.png", history=None if problem else history, eval_name=eval_name,
        cm=np.array(report["confusion_matrix"]), classes=CLASSES, per_class=per_class, overall=report["accuracy"],
        bins=cal["bins"], ece=cal["ece"], robustness=rob and rob["accuracy"],
        title=f"{report['checkpoint']} (epoch {report['epoch']}): {report['n']} test images, "
              f"top-1 {report['accuracy']:.2f}%"))
    return written


def save_error_grid(errors: list[dict], images: np.ndarray, path: Path) -> Path:
    captions = [f"#{e['index']} true {e['true']}\npredicted {e['predicted']}\n{e['confidence']:.1f}% sure"
                for e in errors]
    return plots.save_image_grid(images[[e["index"] for e in errors]], captions, path,
                                 f"the {len(errors)} most confidently wrong test images")


# ----------------------------------------------------------------------------- your own images

def read_image(path: str) -> np.ndarray:
    """Any image file Pillow reads -> uint8 32 x 32 x 3: converted to RGB, the largest centred square
    cropped out, then resized with Pillow's bilinear filter (which antialiases when shrinking)."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.fit(image.convert("RGB"), (IMAGE_SIZE, IMAGE_SIZE),
                                       method=Image.Resampling.BILINEAR))


def _image_error(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "a directory, not an image file"
    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow can read"
    return " ".join(str(e).split()) or type(e).__name__


def classify_files(model: nn.Module, paths: Sequence[str], device: torch.device, batch_size: int,
                   tta: bool = False, amp: bool = False, shift: int = 0) -> int:
    """Print the top-3 classes of each image file; 1 if any file could not be read (the rest still run)."""
    images, readable = [], []
    for path in paths:
        try:
            images.append(read_image(path))
            readable.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            print(f"error: {path}: cannot classify it: {_image_error(e)}", file=sys.stderr)
    if images:
        loader = make_eval_loader(np.stack(images), np.zeros(len(images), dtype=np.int64), batch_size, workers=0,
                                  device=device, on_device=True)
        logits, _ = predict(model, loader, device, amp=amp, tta=tta, shift=shift, channels_last=channels_last(device))
        for path, top in zip(readable, metrics.top_k_classes(logits.softmax(1), CLASSES, 3), strict=True):
            print(f"{path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in top))
    return 0 if len(readable) == len(paths) else 1


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Evaluate a ResNet9 checkpoint on the CIFAR-10 test set, or classify image files (--image).",
        epilog="exit codes: 0 done; 1 some --image file could not be read (the others are still classified), or "
               "a report file could not be written; 2 bad arguments, checkpoint or data set")
    p.add_argument("checkpoint", help="a checkpoint written by train.py, or a .safetensors file written by export.py")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (downloaded if absent)")
    p.add_argument("--out-dir", default=None, help="where plots and report.json go (default: eval/<checkpoint name>)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tta", action="store_true",
                   help="also report accuracy with test-time augmentation (mean logits of image and mirror image)")
    p.add_argument("--tta-shift", type=int, default=None, metavar="PX",
                   help="with --tta, also average over the views moved by PX pixels diagonally both ways (6 views; "
                        "default: the checkpoint's own --tta-shift, 0 if it has none)")
    p.add_argument("--robustness", action=argparse.BooleanOptionalAction, default=None,
                   help="accuracy under 5 corruptions x 3 severities: 15 more passes over the test set, "
                        "about 18 min for 10,000 images on 2 CPU cores (default: on, except on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption noise (default 0)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N test images only (0: all)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: as train.py decides, on with CUDA and on a CPU with native bf16)")
    p.add_argument("--image", nargs="+", metavar="FILE",
                   help="classify these image files and print their top-3 classes; any size or mode: converted "
                        "to RGB, the centre square cropped, resized to 32x32 (bilinear); the test set is not read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except WriteError as e:  # the measurements are lost with it, but nothing written before is damaged
        print(f"error: {e.explained(then='run the same command again')}", file=sys.stderr)
        return 1
    except (CheckpointError, DataError, ValueError, OSError, onnx_model.OnnxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FolderInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def load_test_set(data_dir: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The test images (uint8 N x 32 x 32 x 3) and labels, the first `limit` only if it is not 0."""
    folder = ensure_cifar10(data_dir)
    read_meta(folder / META_FILE)  # checks that the folder names the ten classes
    images, labels = read_batch(folder / TEST_FILE)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit < 0:
        raise ValueError(f"--limit must be 0 (all test images) or more, got {args.limit}")
    if args.tta_shift is not None and not 0 <= args.tta_shift <= 16:
        raise ValueError(f"--tta-shift must be in 0..16 pixels, got {args.tta_shift}")
    if Path(args.checkpoint).suffix == ".onnx":
        model, ckpt = onnx_export(args)
        device = torch.device("cpu")
    else:
        ckpt = load_checkpoint(args.checkpoint)
        device = pick_device(args.device)
        given = (args.amp, "--amp" if args.amp else "--no-amp")
        args.amp, args.amp_why = default_amp(device) if args.amp is None else given
        model = model_from_checkpoint(ckpt, args.checkpoint).to(device)
        if channels_last(device):
            model = model.to(memory_format=torch.channels_last)
    if args.tta_shift is None:
        saved = (ckpt.get("config") or {}).get("tta_shift", 0)
        args.tta_shift = saved if type(saved) is int and 0 <= saved <= 16 else 0
    if args.image:
        return classify_files(model, args.image, device, args.batch_size, args.tta, args.amp, args.tta_shift)
    out_dir = Path(args.out_dir or Path("eval") / Path(args.checkpoint).stem)
    with hold(out_dir, "--out-dir"):  # one writer at a time; the folder is removed again if nothing is written
        return write_report(model, ckpt, device, args, out_dir)


def parameters_of(model: nn.Module, ckpt: dict) -> int:
    """The network's parameter count: the module's own, or for an ONNX file the count of the network
    its config describes (the file's initializers are folded, and quantised for int8)."""
    if not isinstance(model, onnx_model.OnnxClassifier):
        return count_parameters(model)
    config = ckpt["config"]
    return count_parameters(build_model(config.get("arch", "resnet9"), config.get("num_classes", 10),
                                        config.get("activation", "relu"), config.get("widths", [])))


def onnx_export(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """An export.py ONNX file as a module (deploy/onnx_model.py) and its metadata in a checkpoint's
    keys; it runs on the CPU in the precision it was exported in (fp32 or int8)."""
    if args.amp or args.device not in ("auto", "cpu"):
        raise ValueError(f"{args.checkpoint}: an ONNX file runs with onnxruntime on the CPU, in its own precision; "
                         "drop --device and --amp")
    model = onnx_model.OnnxClassifier(args.checkpoint)
    meta = model.meta
    quantized = "quantization" in meta
    args.amp, args.amp_why = False, f"onnxruntime, {'int8' if quantized else 'fp32'}"
    epoch = meta.get("epoch", "0")
    return model, {"config": meta["config"], "epoch": int(epoch) if epoch.isdigit() else None,
                   "metrics": None, "onnx": {"int8": quantized, "source_checkpoint": meta.get("source_checkpoint")}}


def write_report(model: nn.Module, ckpt: dict, device: torch.device, args: argparse.Namespace, out_dir: Path) -> int:
    """Measure the model on the test set and write report.json and the figures into `out_dir`."""
    try:  # before the test set is read and measured
        check_folder(out_dir, REPORT_ROOM, "the report and its figures")
    except WriteError as e:
        raise ValueError(f"cannot write to --out-dir {out_dir}: {e.why}; {e.remedy}") from None
    images, labels = load_test_set(args.data_dir, args.limit)
    report = {"checkpoint": str(args.checkpoint), "epoch": ckpt.get("epoch"), "device": str(device), "amp": args.amp,
              "torch": str(torch.__version__), "limit": args.limit, "parameters": parameters_of(model, ckpt),
              "widths": list((ckpt.get("config") or {}).get("widths") or STANDARD_WIDTHS),  # as the model was built
              "pruning": ckpt.get("pruning"), "onnx": ckpt.get("onnx")}
    pruned = report["pruning"] if isinstance(report["pruning"], dict) else {}
    macs = f", {pruned['macs'] / 1e6:.1f} M MACs per image (prune.py)" if isinstance(pruned.get("macs"), int) else ""
    widths = ",".join(map(str, report["widths"]))
    print(f"{args.checkpoint}: {report['parameters']:,} parameters{macs}, widths {widths}")
    report.update(evaluate_test_set(model, images, labels, device, args))
    written = save_figures(report, ckpt, images, out_dir)
    report["figures"] = [str(p) for p in written]
    report_path = out_dir / "report.json"
    with replaced(report_path, "the report") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print("wrote " + ", ".join(str(p) for p in [*written, report_path]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
