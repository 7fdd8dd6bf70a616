"""An ONNX file written by export.py, opened with onnxruntime: checked to be one (its producer,
its uint8 `images` input and `logits` output), run on uint8 images, or wrapped as a module that
takes the normalised batches the rest of the project feeds a model, so that evaluate.py measures
an export exactly as it measures a checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import CIFAR10_MEAN, CIFAR10_STD

PRODUCER = "cifar10-resnet9 export.py"  # export.py's metadata `producer`: what marks a file as ours
OPTIONAL = "pip install -r requirements-optional.txt"


class OnnxError(Exception):
    """Not an ONNX file export.py wrote, or onnxruntime is missing; the message says which."""


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on `path` with `threads` intra-op threads (torch's count by default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxError(f"running an ONNX file needs onnxruntime, not installed here: {OPTIONAL}") from None
    if not Path(path).is_file():
        raise OnnxError(f"{path}: file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable or invalid files
        reason = " ".join(str(e).split())[:160]
        raise OnnxError(f"{path}: not a usable ONNX file ({type(e).__name__}: {reason}); export one with "
                        "python export.py CHECKPOINT --format onnx") from None


def open_export(path: str | os.PathLike, threads: int | None = None):
    """The session and metadata of an export.py ONNX file, or OnnxError saying why it is not one."""
    sess = session(path, threads)
    meta = sess.get_modelmeta().custom_metadata_map
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    shape_ok = len(inputs) == 1 and inputs[0].type == "tensor(uint8)" and list(inputs[0].shape[1:]) == [32, 32, 3]
    if meta.get("producer") != PRODUCER or not shape_ok or [o.name for o in outputs] != ["logits"]:
        raise OnnxError(f"{path}: an ONNX model that export.py did not write (it needs export.py's metadata, a "
                        "uint8 'images' input of N x 32 x 32 x 3 and a 'logits' output); evaluate.py runs the "
                        "files of python export.py CHECKPOINT --format onnx")
    try:
        meta = {**meta, "config": json.loads(meta.get("config", "{}")), "classes": json.loads(meta["classes"])}
    except (KeyError, ValueError):
        raise OnnxError(f"{path}: its metadata is damaged (config or classes); export it again") from None
    return sess, meta


def run(sess, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Logits (float32 N x classes) of uint8 N x 32 x 32 x 3 images, a batch at a time."""
    return np.concatenate([sess.run(["logits"], {"images": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


class OnnxClassifier(nn.Module):
    """An export as a module: normalised float B x 3 x 32 x 32 batches in (data.normalize_batch's
    output, or views of it: flipped, shifted with black borders, corrupted), logits out. Each batch
    goes back to the uint8 pixels it came from (exact: a uint8 value survives the normalisation and
    its inverse in float32) and through the file, which normalises them again inside."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session, self.meta = open_export(path, threads)
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = ((x.float() * self.std + self.mean) * 255).round().clamp(0, 255).to(torch.uint8)
        batch = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"images": batch})[0]).to(x.device)
