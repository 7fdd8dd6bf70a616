"""Benchmark: inference images/s of an exported ONNX file (onnxruntime) against PyTorch, on the CPU.

    python bench/bench_export.py model/learn_rate_consistent_model.pth resnet9.onnx --data-dir /tmp/cifar10

Both run the same uint8 test images (--limit, default 1,000) in the same batches (--batch-size)
with the same number of threads (torch's default here, or --threads): onnxruntime's CPU provider
on the file, and PyTorch eager with the preprocessing of export.py, channels-last, as evaluate.py
runs it on the CPU. The two alternate, `--repeats` times (each pass after a warm-up batch); the
rates are the medians of the repeats and the ratio the median of each repeat's ratio, so a busy
machine slows both alike. Also prints the largest logit difference and the top-1 agreement.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import export
from training.checkpoint import load_checkpoint, model_from_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("onnx")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=export.VERIFY_IMAGES)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's default here)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint).eval()
    images, described = export.verification_images(args.data_dir, args.limit)
    runs = [export.compare(Path(args.onnx), model, images, args.batch_size) for _ in range(args.repeats)]
    ort = [r["onnxruntime_images_per_s"] for r in runs]
    pt = [r["torch_images_per_s"] for r in runs]
    result = {"images": described, "batch_size": args.batch_size, "threads": runs[0]["threads"],
              "repeats": args.repeats, "onnxruntime_images_per_s": statistics.median(ort),
              "torch_images_per_s": statistics.median(pt),
              "ratio": statistics.median(o / t for o, t in zip(ort, pt, strict=True)),
              "max_abs_diff": max(r["max_abs_diff"] for r in runs), "top1_agreement": runs[0]["top1_agreement"],
              "onnx_bytes": Path(args.onnx).stat().st_size, "cpu": platform.processor() or platform.machine(),
              "torch": str(torch.__version__)}
    print(f"{described}; batch {args.batch_size}, {result['threads']} thread(s), median of {args.repeats}:")
    print(f"  onnxruntime {result['onnxruntime_images_per_s']:.0f} images/s, PyTorch "
          f"{result['torch_images_per_s']:.0f} images/s, ratio {result['ratio']:.2f}x; largest |logit difference| "
          f"{result['max_abs_diff']:.3g}, top-1 agreement {result['top1_agreement']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
