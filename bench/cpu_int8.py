"""int8 against fp32 in onnxruntime, side by side in one process: each checkpoint exported by
export.py as fp32 and as int8 ONNX, then held-out accuracy, images/s and file size of every file.

    python bench/cpu_int8.py --data-dir /tmp/cifar10 --out bench/cpu-int8 --reference best \\
        --model paper=model/learn_rate_consistent_model.pth --model best=model/resnet9_best.pth \\
        --model pruned50=pruned/best-flops50.pth

Accuracy: every test_batch image, one view, through onnxruntime (the held-out split: the files
were never trained, calibrated or chosen on it). Speed: `--repeats` rounds; in each round every
file runs over the same `--images` test images in batches of `--batch-size` with `--threads`
threads (after a warm-up batch), one file after the other, so a busy machine slows them alike.
Rates are medians over the rounds; a ratio is the median of the round's ratios to the reference
model's fp32 file (`--reference`: the unpruned network). Results: results.json, results.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from data import TEST_FILE, ensure_cifar10, read_batch  # noqa: E402
from deploy import onnx_model  # noqa: E402
from files.writes import replaced  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name and its int8 instructions, as lscpu says."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), []))
    int8 = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags] or ["avx2 only"]
    return f"{name} ({', '.join(int8)})"


def exported(name: str, checkpoint: str, out: Path, args: argparse.Namespace) -> list[dict]:
    """Export `checkpoint` as fp32 and as int8 with export.py's own command line; the rows of both."""
    rows = []
    for fmt, extra in (("fp32", []), ("int8", ["--int8", "--calibration-images", str(args.calibration_images)])):
        path = out / f"{name}-{fmt}.onnx"
        argv = [checkpoint, "--format", "onnx", "--out", str(path), "--data-dir", args.data_dir, *extra]
        start, buffer = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = export.main(argv)
        print(buffer.getvalue().strip())
        if code:
            raise SystemExit(f"export.py {' '.join(argv)} failed ({code})")
        rows.append({"model": name, "format": fmt, "checkpoint": checkpoint, "file": str(path),
                     "bytes": path.stat().st_size, "command": "python export.py " + " ".join(argv),
                     "export_s": round(time.perf_counter() - start, 1)})
    return rows


def speeds(sessions: list, images: np.ndarray, batch_size: int, repeats: int) -> list[list[float]]:
    """images/s of each session in each round, the sessions in turn within a round."""
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    rounds = []
    for _ in range(repeats):
        row = []
        for sess in sessions:
            sess.run(["logits"], {"images": batches[0]})
            start = time.perf_counter()
            for b in batches:
                sess.run(["logits"], {"images": b})
            row.append(len(images) / (time.perf_counter() - start))
        rounds.append(row)
    return rounds


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured by `{meta['command']}` on {meta['cpu']}, {meta['threads']} thread(s), onnxruntime "
             f"{meta['onnxruntime']}, batch {meta['batch_size']}, median of {meta['repeats']} rounds over "
             f"{meta['images']} test images; accuracy on all {meta['test_images']} held-out test_batch images of "
             f"{meta['data']}, one view.", "",
             "| model | format | held-out accuracy | against its fp32 | images/s | against its fp32 | "
             f"against {meta['reference']} fp32 | file |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['accuracy']:.2f}% | {r['accuracy_vs_fp32']:+.2f} | "
                     f"{r['images_per_s']:,.0f} | {r['speed_vs_fp32']:.2f}× | {r['speed_vs_reference']:.2f}× | "
                     f"{r['bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="folder for the ONNX files and results.json / results.md")
    p.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    p.add_argument("--reference", required=True, help="the NAME whose fp32 file the speeds are compared to")
    p.add_argument("--images", type=int, default=2000, help="test images per timed pass (default 2000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-images", type=int, default=export.CALIBRATION_IMAGES)
    args = p.parse_args()
    models = dict(item.split("=", 1) for item in args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    rows = [row for name, ckpt in models.items() for row in exported(name, ckpt, out, args)]
    images, labels = read_batch(ensure_cifar10(args.data_dir, download=False) / TEST_FILE)
    sessions = [onnx_model.session(r["file"], args.threads) for r in rows]
    for r, sess in zip(rows, sessions, strict=True):
        r["accuracy"] = 100.0 * float((onnx_model.run(sess, images, args.batch_size).argmax(1) == labels).mean())
    rounds = speeds(sessions, images[:args.images], args.batch_size, args.repeats)
    ref = next(i for i, r in enumerate(rows) if r["model"] == args.reference and r["format"] == "fp32")
    for i, r in enumerate(rows):
        own = next(j for j, o in enumerate(rows) if o["model"] == r["model"] and o["format"] == "fp32")
        r["images_per_s"] = round(statistics.median(x[i] for x in rounds), 1)
        r["speed_vs_fp32"] = round(statistics.median(x[i] / x[own] for x in rounds), 3)
        r["speed_vs_reference"] = round(statistics.median(x[i] / x[ref] for x in rounds), 3)
        r["accuracy_vs_fp32"] = round(r["accuracy"] - rows[own]["accuracy"], 2)
        r["rounds_images_per_s"] = [round(x[i], 1) for x in rounds]
    import onnxruntime
    meta = {"command": "python bench/cpu_int8.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
            "threads": args.threads, "onnxruntime": onnxruntime.__version__, "torch": str(torch.__version__),
            "batch_size": args.batch_size, "repeats": args.repeats, "images": min(args.images, len(images)),
            "test_images": len(images), "data": args.data_dir, "reference": args.reference}
    for name, text in (("results.json", json.dumps({"meta": meta, "rows": rows}, indent=1)),
                       ("results.md", table(rows, meta))):
        with replaced(out / name, "the results") as tmp:
            tmp.write_text(text)
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
