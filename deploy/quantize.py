"""int8 with onnxruntime.quantization: static quantisation of an fp32 export, calibrated on
training images only (never test_batch): QDQ format, per-channel int8 weights in a 7-bit range,
uint8 activations, after onnxruntime's pre-processing (shape inference and graph optimisation).

Why the 7-bit range (`reduce_range`): on a CPU without VNNI, onnxruntime multiplies uint8 by int8 with
AVX2's VPMADDUBSW, which adds two products in 16 bits and saturates: 255 x 127 x 2 overflows,
255 x 64 x 2 does not. With full-range weights the shipped resnet9_best-int8 agreed with fp32 on
96.75% of 2,000 training images on an AVX2-only EPYC (89.97% held-out against 91.40% on AVX512-VNNI);
with 7-bit weights, 99.75% at the same speed (docs/export.md, "int8"). On a VNNI CPU the products
are summed in 32 bits and the 7-bit file computes the same integers.

The calibration method and the number of images are export.py's defaults, chosen by measurement
(bench/cpu_int8.py, docs/export.md, "int8"): on held-in training images outside the calibration
sample, never on the test set.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from data import TRAIN_FILES, ensure_cifar10, read_batch, stratified_order

METHODS = ("minmax", "entropy", "percentile")  # onnxruntime's CalibrationMethod MinMax, Entropy, Percentile
CALIBRATION_SEED = 1  # the calibration sample is fixed: a stratified draw of the training images


def training_images(data_dir: str | os.PathLike, n: int, skip: int = 0) -> np.ndarray:
    """`n` training images (uint8 N x 32 x 32 x 3), class-stratified and seeded, from data_batch_1..5
    alone: after the first `skip` of the same order (so that two calls can take samples apart)."""
    folder = ensure_cifar10(data_dir, download=False)
    batches = [read_batch(folder / name) for name in TRAIN_FILES]
    images, labels = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    if skip + n > len(images):
        raise ValueError(f"--calibration-images {n}: the training set has {len(images)} images")
    return images[stratified_order(labels, CALIBRATION_SEED)[skip:skip + n]]


def quantize(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray, method: str,
             batch_size: int = 64) -> None:
    """Write `fp32_path` quantised to int8 at `out_path`, its activation ranges calibrated on `images`;
    the fp32 file's metadata is kept, with how it was quantised added."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, reduce_range=True,
                            calibrate_method=calibrate)
    source, proto = onnx.load(str(fp32_path)), onnx.load(str(out_path))
    proto.doc_string = source.doc_string + " Quantised to int8 (QDQ) by export.py --int8."
    del proto.metadata_props[:]
    for prop in source.metadata_props:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    proto.metadata_props.add(key="quantization", value=json.dumps(
        {"format": "QDQ", "weights": "int8 per channel, 7-bit range", "activations": "uint8", "calibration": method,
         "calibration_images": len(images), "calibration_data": "training images (data_batch_1..5)"}))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
