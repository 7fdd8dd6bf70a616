"""Export a checkpoint for use outside this project: safetensors weights, or an ONNX model.

    python export.py model/learn_rate_consistent_model.pth --format safetensors --out resnet9.safetensors
    python export.py model/learn_rate_consistent_model.pth --format onnx --out resnet9.onnx --data-dir data
    python export.py model/resnet9_best.pth --format onnx --int8 --out resnet9_best-int8.onnx --data-dir data

safetensors: the model's state dict (BatchNorm running statistics included) with the run's config,
the class names, the normalisation and the SHA-256 of the tensors as metadata; no pickle, so
loading it runs no code. `evaluate.py` and `hubconf.py` read it as they read a .pth.

ONNX (opset 21, dynamic batch axis): input `images`, uint8 N x 32 x 32 x 3 (RGB, HWC: the layout of
`np.asarray(pil_image)`, 0..255); the scaling to [0, 1] and the CIFAR-10 mean/std normalisation are
inside the graph; output `logits`, float32 N x 10 in the order of the `classes` metadata. After
writing, the file is run with onnxruntime against PyTorch on up to 1,000 test images of --data-dir
(seeded random images when no --data-dir is given, and it says so): the largest logit difference,
the top-1 agreement and both runtimes' images/s are printed; a difference beyond LOGIT_TOLERANCE
deletes the file. With --int8 the fp32 graph is quantised to int8 (deploy/quantize.py), calibrated
on --calibration-images training images of --data-dir (never its test set), and checked against
its own bound: top-1 agreement with PyTorch of at least INT8_AGREEMENT, since an int8 model cannot
meet the fp32 logit tolerance. The packages come from requirements-optional.txt (docs/export.md).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import CIFAR10_MEAN, CIFAR10_STD, CLASSES, TEST_FILE, DataError, ensure_cifar10, normalize_batch, read_batch
from deploy import onnx_model, quantize
from files.writes import WriteError, check_folder, replaced
from training.checkpoint import (
    DIGEST_KEY,
    OPTIONAL,
    CheckpointError,
    checkpoint_size,
    clean_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    tensor_digest,
)
from training.config import OneLineParser

ONNX_OPSET = 21  # the newest opset that onnxruntime 1.18 (requirements-optional.txt's oldest) runs
VERIFY_IMAGES = 1000  # test images run through both runtimes after an ONNX export
# Largest |logit difference| accepted between onnxruntime and PyTorch, both float32. They sum the
# same products in another order (and the exporter folds BatchNorm into the convolutions), which moves
# a logit by about 1e-6 of its size: measured 2.3e-5 on the trained checkpoint's 1,000 test images,
# logits up to 48 (docs/export.md). A real conversion error (no normalisation, wrong channel order,
# BatchNorm in training mode) moves logits by 0.1 or more (tests/test_export.py exports one). 1e-3
# is 40x the measured difference and 100x below such an error.
LOGIT_TOLERANCE = 1e-3
# Least top-1 agreement (%) of an int8 export with the fp32 PyTorch model on the check images.
# Measured 99.2-99.8% on the shipped and pruned models (bench/cpu_int8.py); a calibration that misses
# the activations' ranges (images of another layout, or blank ones: tests/test_export.py) lands far
# below. 98% allows 2 in 100 flips, about 3x what was measured.
INT8_AGREEMENT = 98.0
CALIBRATION_IMAGES = 512  # training images for the int8 calibration (default; chosen in docs/export.md, "int8")
CALIBRATION = "minmax"  # the int8 calibration method (default; chosen likewise)
INPUT_DOC = ("images: uint8 [batch, 32, 32, 3], RGB, height x width x channel (the layout of np.asarray of a PIL "
             "image), values 0..255; scaling to [0, 1] and normalisation with the CIFAR-10 mean "
             f"{list(CIFAR10_MEAN)} and std {list(CIFAR10_STD)} happen inside the graph")
OUTPUT_DOC = "logits: float32 [batch, num_classes], in the order of the 'classes' metadata; softmax for probabilities"
WEIGHTS_INPUT_DOC = ("float32 [batch, 3, 32, 32], RGB scaled to [0, 1] and normalised with the CIFAR-10 mean "
                     f"{list(CIFAR10_MEAN)} and std {list(CIFAR10_STD)} (data.normalize_batch)")


class ExportError(Exception):
    """Bad input or a failed check; the message says what to do."""


class VerificationFailed(ExportError):
    """The ONNX file computes something other than the PyTorch model; it has been deleted."""


class WithPreprocessing(nn.Module):
    """The model with its input preparation: uint8 N x 32 x 32 x 3 in, logits out. It normalises with
    `data.normalize_batch`, the function evaluate.py uses, so both compute the same numbers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_batch(images.permute(0, 3, 1, 2)))


def require(*modules: str, feature: str) -> None:
    """Import the optional packages a feature needs, or say in one line how to install them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name.split(".")[0])
    if missing:
        raise ExportError(f"{feature} needs {', '.join(missing)}, not installed here: {OPTIONAL}")


def check_writable(out: Path, needed: int) -> None:
    """Fail before any work if --out cannot be written (a folder, or its folder absent or read-only) or
    its disk has less than `needed` bytes free (the file is written next to the one it replaces)."""
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; give a file name")
    if not out.parent.is_dir():  # no folders are made for a file named on the command line
        problem = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise ExportError(f"--out {out}: cannot write there ({out.parent} {problem}); pick a writable folder")
    try:
        check_folder(out.parent, needed, "the exported file")
    except WriteError as e:
        raise ExportError(f"--out {out}: cannot write there ({e.why}); {e.remedy}") from None


def metadata(ckpt: dict, source: Path) -> dict[str, str]:
    """What a user of the exported file needs besides the weights, as strings."""
    meta = {"producer": onnx_model.PRODUCER, "source_checkpoint": source.name,
            "epoch": str(ckpt.get("epoch", 0)), "config": json.dumps(ckpt.get("config", {})),
            "classes": json.dumps(list(ckpt.get("classes") or CLASSES)),
            "mean": json.dumps(list(CIFAR10_MEAN)), "std": json.dumps(list(CIFAR10_STD)),
            "torch_version": str(torch.__version__)}
    if isinstance(ckpt.get("metrics"), dict):
        meta["metrics"] = json.dumps(ckpt["metrics"])
    return meta


def export_safetensors(ckpt: dict, model: nn.Module, source: Path, out: Path) -> None:
    """The state dict (contiguous: channels-last weights are stored in plain order) and metadata."""
    from safetensors.torch import save
    state = {k: v.detach().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    meta = {**metadata(ckpt, source), "input": WEIGHTS_INPUT_DOC, DIGEST_KEY: tensor_digest({"model": state})}
    with replaced(out, "the safetensors file", needed=checkpoint_size(state)) as tmp:
        tmp.write_bytes(save(state, metadata=meta))  # written as any file here: the umask's permissions
        load_checkpoint(tmp)  # read back: loads, digest and config checked, as evaluate.py will


def export_onnx(model: nn.Module, meta: dict[str, str], path: Path) -> None:
    """Write `model` with its preprocessing as ONNX with a dynamic batch axis and the metadata."""
    import onnx
    wrapped = WithPreprocessing(model).eval()
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its passes on stdout
        torch.onnx.export(wrapped, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=ONNX_OPSET,
                          dynamo=True, external_data=False, verbose=False)
    proto = onnx.load(str(path))
    proto.doc_string = f"ResNet9 trained on CIFAR-10. Input {INPUT_DOC}. Output {OUTPUT_DOC}."
    proto.graph.input[0].doc_string, proto.graph.output[0].doc_string = INPUT_DOC, OUTPUT_DOC
    for key, value in {**meta, "input": INPUT_DOC, "output": OUTPUT_DOC}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def verification_images(data_dir: str | None, limit: int) -> tuple[np.ndarray, str]:
    """Up to `limit` test images (uint8 N x 32 x 32 x 3) of --data-dir, or seeded random ones."""
    if data_dir is None:
        images = np.random.default_rng(0).integers(0, 256, (limit, 32, 32, 3), dtype=np.uint8)
        return images, f"{limit} random images (no --data-dir given: pass one to check on real test images)"
    folder = ensure_cifar10(data_dir, download=False)
    images = read_batch(folder / TEST_FILE)[0][:limit]
    return images, f"the first {len(images)} test images of {folder}"


def _timed(run, batches: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Outputs of `run` over the batches, and images/s (after one untimed warm-up batch)."""
    run(batches[0])
    start = time.perf_counter()
    outputs = [run(b) for b in batches]
    return np.concatenate(outputs), sum(map(len, batches)) / (time.perf_counter() - start)


def compare(path: Path, model: nn.Module, images: np.ndarray, batch_size: int) -> dict:
    """Run the ONNX file (onnxruntime, CPU) and the PyTorch model (eager, channels-last as evaluate.py
    runs it on the CPU) on the same batches with the same number of threads; compare their logits."""
    threads = torch.get_num_threads()
    session = onnx_model.session(path, threads)
    reference = WithPreprocessing(model.to(memory_format=torch.channels_last)).eval()

    @torch.inference_mode()
    def torch_run(batch: np.ndarray) -> np.ndarray:
        return reference(torch.from_numpy(batch)).float().numpy()

    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    ort_logits, ort_speed = _timed(lambda b: session.run(["logits"], {"images": b})[0], batches)
    torch_logits, torch_speed = _timed(torch_run, batches)
    return {"n": len(images), "max_abs_diff": float(np.abs(ort_logits - torch_logits).max()),
            "top1_agreement": 100.0 * float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
            "onnxruntime_images_per_s": ort_speed, "torch_images_per_s": torch_speed, "threads": threads,
            "batch_size": batch_size, "max_abs_logit": float(np.abs(torch_logits).max())}


def export_and_verify_onnx(ckpt: dict, model: nn.Module, source: Path, out: Path, data_dir: str | None,
                           limit: int, batch_size: int, int8: tuple[str, int] | None = None) -> dict:
    """Export to a temporary file (quantised to int8 with `int8`: its calibration method and images),
    check it against PyTorch, and move it into place only if it agrees."""
    images, described = verification_images(data_dir, limit)  # a bad --data-dir fails before the export
    calibration = quantize.training_images(data_dir, int8[1]) if int8 else None
    with replaced(out, "the ONNX file", needed=checkpoint_size(model.state_dict())) as tmp:
        if int8 is None:
            export_onnx(model, metadata(ckpt, source), tmp)
        else:
            with tempfile.TemporaryDirectory() as folder:
                fp32 = Path(folder) / "fp32.onnx"
                export_onnx(model, metadata(ckpt, source), fp32)
                quantize.quantize(fp32, tmp, calibration, int8[0])
        result = compare(tmp, model, images, batch_size)
        result["images"] = described
        print_comparison(result, int8)
        if int8 and not result["top1_agreement"] >= INT8_AGREEMENT:
            raise VerificationFailed(
                f"{out}: the int8 model agrees with PyTorch's top-1 on {result['top1_agreement']:.2f}% of "
                f"{result['images']} (bound {INT8_AGREEMENT:g}%); the file was not kept; try another --calibration "
                "or more --calibration-images")
        if not int8 and not result["max_abs_diff"] <= LOGIT_TOLERANCE:  # also catches NaN
            raise VerificationFailed(
                f"{out}: onnxruntime's logits differ from PyTorch's by up to {result['max_abs_diff']:.3g} "
                f"(tolerance {LOGIT_TOLERANCE:g}; top-1 agreement {result['top1_agreement']:.2f}%); "
                "the file was not kept")
    return result


def print_comparison(r: dict, int8: tuple[str, int] | None = None) -> None:
    if int8:
        print(f"int8, calibrated ({int8[0]}) on {int8[1]} training images; checked on {r['images']}: top-1 "
              f"agreement {r['top1_agreement']:.2f}% (bound {INT8_AGREEMENT:g}%), largest |logit difference| "
              f"{r['max_abs_diff']:.3g} (logits up to {r['max_abs_logit']:.1f})")
    else:
        print(f"checked on {r['images']}: largest |logit difference| {r['max_abs_diff']:.3g} "
              f"(tolerance {LOGIT_TOLERANCE:g}; logits up to {r['max_abs_logit']:.1f}), "
              f"top-1 agreement {r['top1_agreement']:.2f}%")
    print(f"speed on the CPU, batch {r['batch_size']}, {r['threads']} thread(s): onnxruntime "
          f"{r['onnxruntime_images_per_s']:.0f} images/s, PyTorch {r['torch_images_per_s']:.0f} images/s "
          f"(eager, channels-last; one timed pass after a warm-up batch)")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Export a checkpoint as safetensors weights or an ONNX model (docs/export.md).",
                      epilog="exit codes: 0 written; 1 the ONNX file disagreed with PyTorch and was deleted, or the "
                             "file could not be written; 2 bad input or a missing optional package")
    p.add_argument("checkpoint", help="a checkpoint written by train.py (or a .safetensors export)")
    p.add_argument("--format", required=True, choices=("safetensors", "onnx"), help="what to write")
    p.add_argument("--out", required=True, help="the file to write (replaced only once the new one is complete)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/: the ONNX file is checked on its test images "
                        "(default: on seeded random images)")
    p.add_argument("--limit", type=int, default=VERIFY_IMAGES,
                   help=f"images for the ONNX check (default {VERIFY_IMAGES})")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch in the ONNX check (default 250)")
    p.add_argument("--int8", action="store_true",
                   help=f"with --format onnx: quantise to int8 (QDQ), calibrated on training images of --data-dir, "
                        f"kept if its top-1 agrees with PyTorch on at least {INT8_AGREEMENT:g}%% of the check images")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"with --int8: training images to calibrate on (default {CALIBRATION_IMAGES})")
    p.add_argument("--calibration", choices=quantize.METHODS, default=CALIBRATION,
                   help=f"with --int8: how activation ranges are set from the calibration images "
                        f"(default {CALIBRATION})")
    return p


def run(args: argparse.Namespace) -> int:
    if args.limit < 1 or args.batch_size < 1:
        raise ExportError(f"--limit and --batch-size must be at least 1 (got {args.limit}, {args.batch_size})")
    if args.int8 and (args.format != "onnx" or args.data_dir is None):
        raise ExportError("--int8 needs --format onnx and --data-dir (it calibrates on that folder's training images)")
    if args.int8 and args.calibration_images < 1:
        raise ExportError(f"--calibration-images must be at least 1 (got {args.calibration_images})")
    if args.format == "safetensors":
        require("safetensors.torch", feature="--format safetensors")
    else:
        require("onnx", "onnxscript", "onnxruntime", feature="--format onnx")
    source, out = Path(args.checkpoint), Path(args.out)
    ckpt = load_checkpoint(source)
    model = model_from_checkpoint(ckpt, source).eval()
    check_writable(out, checkpoint_size(model.state_dict()))
    if args.format == "safetensors":
        export_safetensors(ckpt, model, source, out)
    else:
        export_and_verify_onnx(ckpt, model, source, out, args.data_dir, args.limit, args.batch_size,
                               (args.calibration, args.calibration_images) if args.int8 else None)
    kind = "onnx, int8" if args.int8 else args.format
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {kind}) from {source} (epoch {ckpt.get('epoch')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except VerificationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:  # the file it would replace is as it was
        print(f"error: {e.explained(then='run the same command again')}", file=sys.stderr)
        return 1
    except (ExportError, CheckpointError, DataError, OSError, ValueError, onnx_model.OnnxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
