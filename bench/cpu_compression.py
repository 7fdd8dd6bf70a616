"""Pruning measured end to end on a CPU: prune.py, evaluate.py --tta, and onnxruntime images/s.

    python bench/cpu_compression.py --parent P --data-dir /tmp/cifar10 --out /tmp/compress \\
        --items oneshot-0.5-l1 prune-0.5-l1 prune-0.5-group prune-0.5-l1-kd
    python bench/cpu_compression.py --parent P --data-dir /tmp/cifar10 --out /tmp/compress --throughput
    python bench/cpu_compression.py --parent P --out /tmp/compress --plot docs/compression.png
    python bench/cpu_compression.py --parent P --data-dir /tmp/tiny --out /tmp/dry --dry-run   # a test

An item is named after what it runs:
- `oneshot-F-C`: `prune.py P --flops F --steps 1 --finetune-epochs 0 --importance C`, no fine-tuning;
- `prune-F-C`: `prune.py P --flops F --steps K --finetune-epochs N --importance C` plus
  --finetune-flags (train.py's flags for the fine-tunes; default the parent's own recipe);
- `prune-F-C-kd`: the same with `--teacher P`, the unpruned parent as teacher.
Each pruned checkpoint, and the parent (item `parent`, always measured first), then goes through
`evaluate.py --tta` (plain and 6-view accuracy on the held-out `test_batch`) and `export.py --format
onnx` (checked against PyTorch with onnxruntime). Every process is timed whole. --throughput then
measures onnxruntime images/s of every exported network side by side with the parent's, in this
one process: the parent and each pruned network alternate, --repeats times, and the speed-up is the
median of the per-repeat ratios, so a machine that slows down slows both alike.

OUT/results.json holds every item and is rewritten after each; an item already measured is not run
again, so a stopped bench continues where it stopped. --plot draws held-out accuracy against the
MACs kept, each item a point, with the parent's.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ITEM = re.compile(r"(?P<kind>oneshot|prune)-(?P<flops>0?\.\d+|1(\.0)?)-(?P<importance>l1|bn|group)(?P<kd>-kd)?$")


def item_name(text: str) -> str:
    """An --items entry, checked: `oneshot-F-C`, `prune-F-C` or `prune-F-C-kd`."""
    match = ITEM.match(text)
    if not match or (match["kind"] == "oneshot" and match["kd"]) or not 0 < float(match["flops"]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected oneshot-F-C, prune-F-C or prune-F-C-kd, F in (0, 1), "
                                         "C one of l1, bn, group")
    return text


def timed(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run `cmd` from the project's root with its output in `log`; its exit code and wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def prune_command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    m = ITEM.match(name)
    cmd = ["prune.py", args.parent, "--flops", m["flops"], "--importance", m["importance"],
           "--round-to", str(args.round_to), "--out", str(out / "pruned" / f"{name}.pth"), "--overwrite"]
    if m["kind"] == "oneshot":
        return [*cmd, "--steps", "1", "--finetune-epochs", "0"]
    cmd += ["--steps", str(args.steps), "--finetune-epochs", str(args.finetune_epochs), "--data-dir", args.data_dir,
            "--seed", str(args.seed), *shlex.split(args.finetune_flags), *args.extra]
    return [*cmd, "--teacher", args.parent] if m["kd"] else cmd


def measure(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One item: prune (unless the parent), evaluate, export; the numbers and seconds of each."""
    ckpt = Path(args.parent) if name == "parent" else out / "pruned" / f"{name}.pth"
    result: dict = {"item": name}
    if name != "parent":
        cmd = prune_command(name, args, out)
        code, seconds = timed(cmd, out / "logs" / f"{name}-prune.log")
        result.update(command=" ".join(["python", *cmd]), prune_exit=code, prune_s=round(seconds, 1))
        if code != 0:
            return result
    code, seconds = timed(["evaluate.py", str(ckpt), "--data-dir", args.data_dir, "--tta", "--no-robustness",
                           "--out-dir", str(out / "eval" / name), *args.eval_extra], out / "logs" / f"{name}-eval.log")
    result.update(eval_exit=code, eval_s=round(seconds, 1))
    if code != 0:
        return result
    report = json.loads((out / "eval" / name / "report.json").read_text())
    result.update(plain=report["accuracy"], tta=report["tta"]["accuracy"])
    onnx = out / "onnx" / f"{name}.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)  # export.py writes into a folder that is there
    code, seconds = timed(["export.py", str(ckpt), "--format", "onnx", "--out", str(onnx), "--data-dir",
                           args.data_dir, *args.export_extra], out / "logs" / f"{name}-export.log")
    result.update(export_exit=code, export_s=round(seconds, 1), onnx=str(onnx) if code == 0 else None)
    from model import widths_of
    from prune import macs_and_params
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    macs, params = macs_and_params(model)
    result.update(macs=macs, params=params, widths=widths_of(model))
    return result


def throughput(results: list[dict], data_dir: str, limit: int, batch_size: int, repeats: int) -> None:
    """onnxruntime images/s of each exported network against the parent's, alternating, in place."""
    import onnxruntime as ort
    import torch

    import export
    images, _ = export.verification_images(data_dir, limit)
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1

    def rate(path: str) -> float:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return export._timed(lambda b: session.run(["logits"], {"images": b})[0], batches)[1]

    parent = next(r for r in results if r["item"] == "parent")
    for r in results:
        if r.get("onnx") and r is not parent:
            pairs = [(rate(parent["onnx"]), rate(r["onnx"])) for _ in range(repeats)]
            r.update(ort_images_per_s=round(statistics.median(p for _, p in pairs), 1),
                     ort_parent_images_per_s=round(statistics.median(q for q, _ in pairs), 1),
                     ort_speedup=round(statistics.median(p / q for q, p in pairs), 3),
                     ort_threads=torch.get_num_threads(), ort_batch=batch_size, ort_repeats=repeats)
            print(f"{r['item']}: onnxruntime {r['ort_images_per_s']:.0f} images/s, the parent "
                  f"{r['ort_parent_images_per_s']:.0f}: {r['ort_speedup']:.2f}x")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = next((r for r in results if r["item"] == "parent" and "tta" in r), None)
    if parent is None:
        raise SystemExit("error: no measured parent in results.json to draw against")
    # Left: every item, the one-shot plummet included; right: the fine-tuned ones, close up, with
    # the parent's accuracy as a line (they sit within 2 points of it, too close to read on the left).
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"oneshot": ("x", "tab:red", "one-shot, no fine-tuning"),
              "prune": ("o", "tab:blue", "iterative, fine-tuned"),
              "kd": ("s", "tab:green", "iterative, fine-tuned, parent as teacher")}
    measured = [r for r in results if "tta" in r and r is not parent]
    for ax, close_up in zip(axes, (False, True), strict=True):
        seen = set()
        for r in measured:
            kind = "kd" if r["item"].endswith("-kd") else r["item"].split("-")[0]
            if close_up and kind == "oneshot":
                continue
            marker, color, label = styles[kind]
            x = 100 * r["macs"] / parent["macs"]
            ax.plot(x, r["tta"], marker, color=color, label=None if kind in seen else label)
            seen.add(kind)
            if close_up or kind == "oneshot":  # the fine-tuned ones are named on the right only
                ax.annotate(r["item"], (x, r["tta"]), textcoords="offset points", fontsize=7,
                            xytext=(4, -9 if kind == "kd" else 3))
        ax.plot(100, parent["tta"], "*", color="black", markersize=12, label="unpruned parent")
        if close_up:
            ax.axhline(parent["tta"], color="black", lw=0.8, ls="--")
            ax.set_title("fine-tuned, close up (dashed: the parent)", fontsize=9)
        else:
            ax.set_title("Pruned ResNet9 on the CIFAR-10 JPEG proxy", fontsize=9)
            ax.legend(fontsize=8, loc="center left")
        ax.set_xlabel("MACs per image, % of the parent's")
        ax.set_ylabel("held-out accuracy, 6-view TTA (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from reports.plots import save_figure
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {save_figure(fig, path)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parent", required=True, help="the checkpoint to prune (and to distil from, -kd items)")
    p.add_argument("--data-dir", help="the CIFAR-10 (proxy) folder; needed unless --plot alone")
    p.add_argument("--out", required=True, help="folder for checkpoints, logs, ONNX files and results.json")
    p.add_argument("--items", nargs="+", type=item_name, default=[], help="what to prune and measure, in order")
    p.add_argument("--steps", type=int, default=3, help="pruning steps of prune-* items (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=9, help="fine-tuning epochs in all, prune-* items (9)")
    p.add_argument("--round-to", type=int, default=16, help="prune.py --round-to: widths a multiple of this (16)")
    p.add_argument("--finetune-flags", default="", help="train.py flags for the fine-tunes, one string")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput", action="store_true", help="measure onnxruntime images/s against the parent")
    p.add_argument("--repeats", type=int, default=5, help="--throughput: alternations of parent and pruned (5)")
    p.add_argument("--plot", metavar="PNG", help="draw the figure from OUT/results.json")
    p.add_argument("--dry-run", action="store_true", help="tiny settings throughout (a test)")
    args = p.parse_args(argv)
    args.extra, args.eval_extra, args.export_extra, limit = [], [], [], 1000
    if args.dry_run:
        args.extra = ["--subset", "100", "--batch-size", "50", "--device", "cpu", "--eval-every", "1"]
        args.eval_extra, args.export_extra, limit = ["--limit", "100", "--device", "cpu"], ["--limit", "20"], 100
        args.steps, args.finetune_epochs, args.repeats = 1, 1, 1
    if (args.items or args.throughput) and not args.data_dir:
        p.error("--data-dir is needed to run items or --throughput")
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    for name in ["parent", *args.items] if args.items else []:
        if any(r["item"] == name and "tta" in r for r in results):
            print(f"{name}: done already, kept")
            continue
        result = {**measure(name, args, out), "seed": args.seed}
        results = [r for r in results if r["item"] != name] + [result]
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: " + (f"{result['params']:,} parameters, {result['macs'] / 1e6:.1f} M MACs, held-out "
                             f"{result['plain']:.2f}% plain, {result['tta']:.2f}% 6-view TTA" if "tta" in result
                             else f"failed: see {out / 'logs'}"), flush=True)
    if args.throughput:
        throughput(results, args.data_dir, limit, 250, args.repeats)
        results_path.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
