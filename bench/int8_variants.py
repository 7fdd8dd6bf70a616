"""int8 weight formats side by side: each variant of onnxruntime's static quantisation, calibrated as
export.py does (MinMax, 512 training images), scored by top-1 agreement with the fp32 ONNX on 2,000
training images outside the calibration sample, and timed over 1,000 of them (3 rounds, in turn).

    python export.py model/resnet9_best.pth --format onnx --out best-fp32.onnx --data-dir /tmp/cifar10
    python bench/int8_variants.py best-fp32.onnx /tmp/cifar10 OUT      # OUT/variants.json

docs/export.md, "On a CPU without VNNI", gives its figures (bench/cpu-int8-avx2/variants.json).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.quantize import training_images

VARIANTS = {  # name: quantize_static's types; "u8s8-reduce" is what export.py --int8 writes
    "u8s8": {"weight_type": QuantType.QInt8, "activation_type": QuantType.QUInt8},
    "u8s8-reduce": {"weight_type": QuantType.QInt8, "activation_type": QuantType.QUInt8, "reduce_range": True},
    "u8u8": {"weight_type": QuantType.QUInt8, "activation_type": QuantType.QUInt8},
    "s8s8": {"weight_type": QuantType.QInt8, "activation_type": QuantType.QInt8},
}


class Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, size: int = 64) -> None:
        self.batches = iter([{"images": images[i:i + size]} for i in range(0, len(images), size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(s: ort.InferenceSession, images: np.ndarray, batch: int = 250) -> np.ndarray:
    return np.concatenate([s.run(None, {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def main() -> None:
    fp32, data_dir, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    calibration, check = training_images(data_dir, 512), training_images(data_dir, 2000, skip=512)
    reference = logits(session(fp32), check).argmax(1)
    files, results = {"fp32": fp32}, {"fp32": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        for name, types in VARIANTS.items():
            files[name] = out / f"{name}.onnx"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quantize_static(str(prepared), str(files[name]), Batches(calibration), quant_format=QuantFormat.QDQ,
                                per_channel=True, calibrate_method=CalibrationMethod.MinMax, **types)
            agreement = float((logits(session(files[name]), check).argmax(1) == reference).mean() * 100)
            results[name] = {"agreement": agreement}
    timed = check[:1000]
    for _ in range(3):
        for name, path in files.items():
            s = session(path)
            logits(s, timed[:250])  # warm-up
            start = time.perf_counter()
            logits(s, timed)
            results[name].setdefault("images_per_s", []).append(len(timed) / (time.perf_counter() - start))
    for name, r in results.items():
        print(name, r.get("agreement", ""), [round(v) for v in r["images_per_s"]])
    (out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
