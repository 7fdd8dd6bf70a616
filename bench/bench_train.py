"""Benchmark: the paper's reference pipeline against the default fast path, side by side, in one run.

    python bench/bench_train.py --data-dir /tmp/cifar10                  # CPU: a few minutes
    python bench/bench_train.py --data-dir /tmp/cifar10 --device cuda --steps 300
    python bench/bench_train.py --data-dir /tmp/cifar10 --extra compile fast-recipe

Measured, in this order, on one machine:
1. augmentation throughput (images/s) of each loader: batches made and on the device, no model;
2. training throughput (data + step, images/s) of the reference configuration (torchvision loader
   with DataLoader workers, eager, fp32, NCHW, plain SGD) and of train.py's default configuration
   on this platform (device loader, its platform defaults), through train.train_one_epoch, at the
   paper's batch of 64; reference and fast alternate, `--repeats` times; the rate is the median of
   the repeats, the ratio the median of each repeat's ratio to the reference run just before it;
3. evaluation throughput (images/s) of both pipelines; peak memory (process RSS; CUDA max allocated).
Prints a markdown table and writes the numbers as JSON (--json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import TorchvisionLoader, load_cifar10
from model import build_model
from train import train_one_epoch
from training.config import TrainConfig, fresh_config
from training.device_loader import DeviceLoader
from training.evaluation import evaluate, make_eval_loader
from training.run import EVAL_BATCH, platform_defaults
from training.runtime import StopFlag, compile_model, cpu_bf16, default_workers, pick_device
from training.step import make_step


@dataclasses.dataclass
class Setup:
    """One configuration to time: which loader, and the step's options."""

    name: str
    loader: str  # "torchvision" or "device"
    amp: bool
    channels_last: bool
    fused: bool
    compile: bool = False
    batch_size: int = 64
    cuda_graph: bool = False


def setups(device: torch.device, extra: list[str]) -> list[Setup]:
    fast = platform_defaults(TrainConfig(), device)
    graph = ", CUDA graph" if fast.cuda_graph else ""
    out = [Setup("reference: torchvision loader, eager, fp32, NCHW", "torchvision", False, False, False),
           Setup(f"default: device loader, amp {fast.amp}, channels_last {fast.channels_last}, fused SGD{graph}",
                 "device", fast.amp, fast.channels_last, True, cuda_graph=fast.cuda_graph)]
    if "fp32" in extra and out[1].amp:  # the default without bf16 autocast
        out.append(dataclasses.replace(out[1], name=out[1].name.replace("amp True", "amp False"), amp=False))
    if "bf16" in extra and not out[1].amp:  # bf16 autocast where it is not the default (emulated on most CPUs)
        out.append(dataclasses.replace(out[1], name=out[1].name.replace("amp False", "amp True"), amp=True))
    if "compile" in extra:  # torch.compile alone
        out.append(dataclasses.replace(out[1], name=out[1].name.removesuffix(graph) + ", compile", compile=True,
                                       cuda_graph=False))
    if "compile-graph" in extra and device.type == "cuda":  # train.py's --compile on CUDA: compiled kernels in a graph
        out.append(dataclasses.replace(out[1], name=out[1].name.removesuffix(graph) + ", compile, CUDA graph",
                                       compile=True, cuda_graph=True))
    if "fast-recipe" in extra:  # its linear schedule changes the lr every step: no CUDA graph
        recipe = platform_defaults(fresh_config({"recipe": "fast"}), device)
        name = out[1].name.removesuffix(graph) + f", batch {recipe.batch_size} (--recipe fast)"
        out.append(dataclasses.replace(out[1], name=name, batch_size=recipe.batch_size, cuda_graph=recipe.cuda_graph))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(kind: str, images, labels, batch: int, device: torch.device, workers: int):
    if kind == "device":
        return DeviceLoader(images, labels, batch, seed=0, device=device)
    return TorchvisionLoader(images, labels, batch, seed=0, workers=workers, device=device)


def augmentation_rate(kind: str, images, labels, device: torch.device, workers: int, batches: int) -> float:
    """Images/s of a loader alone: batches made and moved to the device, nothing else."""
    loader = make_loader(kind, images[: 64 * (batches + 2)], labels[: 64 * (batches + 2)], 64, device, workers)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(2):  # warm up: workers start, first batches
        next(it)
    sync(device)
    start = time.perf_counter()
    n = 0
    for x, _ in it:
        x = x.to(device, non_blocking=True)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - start)


class Trainer:
    """A model, optimizer and loader for one Setup, kept between timed repeats."""

    def __init__(self, setup: Setup, images, labels, device: torch.device, workers: int, steps: int) -> None:
        torch.manual_seed(0)
        self.setup, self.device = setup, device
        model = build_model("resnet9").to(device)
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                         **({"fused": True} if setup.fused else {}))
        self.model = compile_model(model, device) if setup.compile else model
        self.step = make_step(self.model, self.optimizer, F.cross_entropy, device=device, amp=setup.amp,
                              channels_last=setup.channels_last, cuda_graph=setup.cuda_graph,
                              batch_size=setup.batch_size)
        n = setup.batch_size * steps
        self.loader = make_loader(setup.loader, images[:n], labels[:n], setup.batch_size, device, workers)
        self.epoch = 0

    def run_epoch(self) -> float:
        """One pass over `steps` batches through train.train_one_epoch; returns images/s."""
        self.epoch += 1
        self.loader.set_epoch(self.epoch)
        sums = torch.zeros(3, device=self.device)
        sync(self.device)
        start = time.perf_counter()
        with StopFlag() as stop:
            train_one_epoch(self.step, self.loader, stop=stop, sums=sums)
        sync(self.device)
        return sums[2].item() / (time.perf_counter() - start)


def eval_rate(on_device: bool, channels_last: bool, images, labels, device: torch.device, workers: int) -> float:
    model = build_model("resnet9").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_eval_loader(images, labels, EVAL_BATCH, workers=workers, device=device, on_device=on_device)
    evaluate(model, loader, device, channels_last=channels_last)  # warm up
    start = time.perf_counter()
    n = evaluate(model, loader, device, channels_last=channels_last)["n"]
    return n / (time.perf_counter() - start)


def peak_memory(device: torch.device) -> dict:
    to_mb = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / to_mb,
           "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / to_mb}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    native, has = cpu_bf16()
    bf16 = f"{has}, native bf16" if native else f"{has}, no native bf16"
    return f"{cpu} ({bf16}), {cores} cores{gpu}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per repeat (CPU 10, GPU 300)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each configuration (median counts)")
    p.add_argument("--extra", nargs="*", default=[],
                   choices=["compile", "compile-graph", "fp32", "bf16", "fast-recipe"],
                   help="also time these variants of the default configuration")
    p.add_argument("--eval-images", type=int, default=None,
                   help="test images timed in evaluation (default: all on a GPU, 2,000 on the CPU)")
    p.add_argument("--json", default=None, help="where to write the results (default: bench/results-<device>.json)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    steps = args.steps or (300 if device.type == "cuda" else 10)
    workers = default_workers(device)
    data = load_cifar10(args.data_dir, download=False)
    images, labels = data.train_images, data.train_labels
    print(f"# bench_train: {machine(device)}; device {device}; {steps} steps x {args.repeats} repeats; "
          f"{workers} DataLoader worker(s)", flush=True)

    results: dict = {"machine": machine(device), "device": str(device), "steps": steps, "repeats": args.repeats,
                     "workers": workers, "augmentation": {}, "training": {}, "evaluation": {}}
    for kind in ("torchvision", "device"):
        results["augmentation"][kind] = augmentation_rate(kind, images, labels, device, workers, max(steps, 20))
        print(f"augmentation, {kind} loader: {results['augmentation'][kind]:,.0f} images/s", flush=True)

    trainers = [Trainer(s, images, labels, device, workers, steps) for s in setups(device, args.extra)]
    for t in trainers:  # warm-up epoch: worker start-up, allocator, compilation
        t.run_epoch()
    rates: dict[str, list[float]] = {t.setup.name: [] for t in trainers}
    for _ in range(args.repeats):
        for t in trainers:  # alternate, so that drifts of a shared machine hit every configuration alike
            rates[t.setup.name].append(t.run_epoch())
            print(f"training, {t.setup.name}: {rates[t.setup.name][-1]:,.1f} images/s", flush=True)
    reference = statistics.median(rates[trainers[0].setup.name])
    for name, values in rates.items():
        # Paired: each repeat's rate over the reference's in the same repeat, which ran just before it.
        paired = [v / r for v, r in zip(values, rates[trainers[0].setup.name], strict=True)]
        results["training"][name] = {"median": statistics.median(values), "runs": values,
                                     "ratio": statistics.median(paired), "paired_ratios": paired,
                                     "ratio_of_medians": statistics.median(values) / reference}

    n_eval = args.eval_images or (len(data.test_images) if device.type == "cuda" else 2000)
    default = trainers[1].setup
    results["evaluation"]["reference (DataLoader, NCHW)"] = eval_rate(
        False, False, data.test_images[:n_eval], data.test_labels[:n_eval], device, workers)
    results["evaluation"]["default (device batches)"] = eval_rate(
        True, default.channels_last, data.test_images[:n_eval], data.test_labels[:n_eval], device, workers)
    results["memory"] = peak_memory(device)

    fastest_aug = max(results["augmentation"].values())
    lines = [f"Machine: {results['machine']}; device {device}.", "",
             "| measurement | images/s (median) | ratio to reference (median of paired repeats) |",
             "| --- | ---: | ---: |"]
    for kind, rate in results["augmentation"].items():
        lines.append(f"| augmentation only, {kind} loader | {rate:,.0f} | |")
    for name, r in results["training"].items():
        lines.append(f"| training (data + step), {name} | {r['median']:,.1f} | {r['ratio']:.2f}x |")
    for name, rate in results["evaluation"].items():
        lines.append(f"| evaluation, {name} | {rate:,.0f} | |")
    mem = results["memory"]
    lines += ["", f"Peak RSS: {mem['rss_mb']:,.0f} MB (DataLoader workers: {mem['workers_rss_mb']:,.0f} MB)"
              + (f"; CUDA max allocated: {mem['cuda_max_allocated_mb']:,.0f} MB" if "cuda_max_allocated_mb" in mem
                 else "") + ".",
              f"Device-loader augmentation / default training throughput: "
              f"{results['augmentation']['device'] / results['training'][default.name]['median']:,.0f}x; "
              f"fastest augmentation / reference training: {fastest_aug / reference:,.0f}x."]
    print("\n" + "\n".join(lines))
    path = Path(args.json or Path(__file__).parent / f"results-{device.type}.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
