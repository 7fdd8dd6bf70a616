"""Train ResNet9 on CIFAR-10. With no flags this is the paper's recipe.

    python train.py                                   # ResNet9, SGD lr 0.01 momentum 0.9, batch 64, 100 epochs
    python train.py --data-dir /tmp/cifar10 --epochs 2 --subset 2000   # a quick look
    python train.py --resume model/last.pth           # continue a stopped run exactly where it stopped

After every epoch the model is evaluated on the selection split (a fixed, class-stratified
hold-out of --val-size training images; the test set with --val-size 0, as the paper did). If its
accuracy beats the best so far the weights are saved to model/learn_rate_consistent_model.pth;
otherwise the best weights are reloaded before the next epoch (--no-reload-best turns that off).
model/last.pth holds the full state after every epoch (and at Ctrl-C), history.json the curves'
numbers; loss_curve.png and accuracy_curve.png are drawn at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import plots
from checkpoint import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint, unwrap
from data import DataError, TorchvisionLoader, default_workers, load_cifar10, make_eval_loader, split_train_val
from evaluate import evaluate
from model import ARCHITECTURES, build_model
from runtime import Distributed, StopFlag, autocast, pick_device, rng_state, seed_everything, set_rng_state

BEST_NAME = "learn_rate_consistent_model.pth"  # the paper's file name for the best model
LAST_NAME = "last.pth"
HISTORY_NAME = "history.json"
EVAL_BATCH = 500  # images per evaluation batch: no gradients, so larger than the training batch
CPU_EPOCH_MINUTES = 11  # measured: one epoch of 45,000 images on 2 CPU cores (README, "CPU")


class UsageError(Exception):
    """A flag or an output folder that cannot work; the message says what to do instead."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- config and CLI

def _check(kind: Callable, ok: Callable[[object], bool], what: str) -> Callable[[str], object]:
    """An argparse `type` that parses with `kind` and rejects values for which `ok` is false."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


POSITIVE_INT = _check(int, lambda v: v > 0, "a positive integer")
NONNEG_INT = _check(int, lambda v: v >= 0, "an integer >= 0")
ANY_INT = _check(int, lambda v: True, "an integer")
POSITIVE_FLOAT = _check(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
NONNEG_FLOAT = _check(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
MOMENTUM = _check(float, lambda v: 0 <= v < 1, "a momentum in [0, 1)")
WORKERS = _check(lambda s: -1 if s == "auto" else int(s), lambda v: v >= 0 or v == -1, "'auto' or an integer >= 0")
DEVICE = _check(str, lambda v: v in ("auto", "cpu", "mps") or v == "cuda" or
                (v.startswith("cuda:") and v[5:].isdigit()), "auto, cpu, cuda, cuda:N or mps")


def _field(default, help: str, type: Callable | None = None, **extra):
    return field(default=default, metadata={"help": help, "type": type, **extra})


@dataclass
class TrainConfig:
    """Every hyperparameter of a run; the defaults are the paper's recipe. Saved in every checkpoint."""

    arch: str = _field("resnet9", "model architecture", str, choices=ARCHITECTURES)
    num_classes: int = _field(10, "number of classes", POSITIVE_INT)
    epochs: int = _field(100, "passes over the training images", POSITIVE_INT)
    batch_size: int = _field(64, "images per optimizer step (summed over all processes)", POSITIVE_INT)
    lr: float = _field(0.01, "SGD learning rate (constant)", POSITIVE_FLOAT)
    momentum: float = _field(0.9, "SGD momentum", MOMENTUM)
    weight_decay: float = _field(0.0, "L2 weight decay per step", NONNEG_FLOAT)
    seed: int = _field(0, "seed of weights init, shuffling and augmentation", ANY_INT)
    val_size: int = _field(5000, "training images held out to pick the best epoch; 0 picks on the "
                           "test set as the paper did (optimistic)", NONNEG_INT)
    subset: int = _field(0, "train on this many images only (0: all)", NONNEG_INT)
    reload_best: bool = _field(True, "reload the best weights after an epoch that did not improve (the paper)")
    amp: bool = _field(False, "bf16 autocast on CUDA (no effect elsewhere)")
    channels_last: bool = _field(False, "channels-last memory format for weights and inputs")
    data_dir: str = _field("data", "folder holding cifar-10-batches-py/ (downloaded there if absent)", str)
    out: str = _field("model", "folder for checkpoints, history and plots", str)
    device: str = _field("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", DEVICE)
    workers: int = _field(-1, "DataLoader worker processes ('auto' = -1; 0 loads in the main process)", WORKERS)


# Fields a resumed run may change: they say where it runs, not what it computes.
RUN_ENVIRONMENT = {"data_dir", "out", "device", "workers", "epochs"}


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (defaults left out, so explicit flags can be told apart)."""
    p = argparse.ArgumentParser(description="Train ResNet9 on CIFAR-10 (defaults: the paper's recipe).",
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        help_text = f"{meta['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, type=meta["type"], choices=meta.get("choices"), help=help_text)
    p.add_argument("--resume", metavar="LAST_PTH", help="continue the run saved in this last.pth")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's checkpoints in --out (default: refuse to start)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """The explicitly given config fields, and the namespace (for --resume / --overwrite)."""
    args = get_args_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}, args


# ----------------------------------------------------------------------------- one epoch

@torch.no_grad()
def _show(bar: tqdm, sums: torch.Tensor) -> None:
    loss_sum, correct, n = sums.tolist()  # the only host sync of the loop, every few dozen steps
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss
    bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", acc=f"{100 * correct / max(n, 1):.2f}%")


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device, *,
                    amp: bool, channels_last: bool, stop: StopFlag, sums: torch.Tensor, start_step: int = 0,
                    desc: str = "", show_progress: bool = True) -> int:
    """Train over the loader's remaining steps, adding [loss sum, correct, images] into `sums`.

    Stops after the current step when `stop` is requested. Returns the step reached in the epoch."""
    model.train()
    step = start_step
    bar = tqdm(total=loader.images_left, desc=desc, unit="img", unit_scale=True, leave=False,
               dynamic_ncols=True, mininterval=1.0, disable=None if show_progress else True)
    refresh = max(1, min(50, len(loader) // 10))
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += loss.detach().float() * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += len(y)
        step += 1
        bar.update(len(y))
        if step % refresh == 0:
            _show(bar, sums)
        if stop.requested:
            break
    bar.close()
    loss_sum = sums[0].item()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss
    return step


# ----------------------------------------------------------------------------- run state

@dataclass
class Progress:
    """Where a run stands; saved in last.pth so that --resume continues exactly."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    epoch: int = 0  # epochs completed
    step: int = 0  # steps of the next epoch already taken (non-zero after a mid-epoch stop)
    partial: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # that epoch's [loss sum, correct, images]
    partial_seconds: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    reloads: int = 0
    history: list = field(default_factory=list)


def _last_state(cfg: TrainConfig, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"kind": "last", "config": dataclasses.asdict(cfg), "progress": dataclasses.asdict(progress),
            "model": clean_state_dict(unwrap(model).state_dict()), "optimizer": optimizer.state_dict(),
            "epoch": progress.epoch, "rng": rng_state(), "torch_version": str(torch.__version__)}


def _best_state(cfg: TrainConfig, progress: Progress, weights: dict, metrics: dict) -> dict:
    return {"kind": "best", "config": dataclasses.asdict(cfg), "run_id": progress.run_id, "model": weights,
            "epoch": progress.epoch, "metrics": metrics, "history": progress.history,
            "torch_version": str(torch.__version__)}


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def prepare_output(out: Path, *, resuming_run: str | None, overwrite: bool) -> None:
    """Make sure --out is writable and holds no other run's checkpoints (unless --overwrite)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}; pick a writable folder") from None
    for name in (BEST_NAME, LAST_NAME):
        path = out / name
        if overwrite or not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
            owner = ckpt.get("run_id") or ckpt.get("progress", {}).get("run_id")
        except (CheckpointError, AttributeError):
            owner = None
        if resuming_run is None or owner != resuming_run:
            raise UsageError(f"{path} belongs to another run; continue it with --resume {out / LAST_NAME}, "
                             "choose another --out, or pass --overwrite to replace it")


def _check_progress(p: Progress) -> None:
    ints = (p.epoch, p.step, p.best_epoch, p.reloads)
    if not (all(type(v) is int and v >= 0 for v in ints) and isinstance(p.history, list)
            and isinstance(p.partial, list) and len(p.partial) == 3
            and all(isinstance(v, (int, float)) for v in (*p.partial, p.best_acc, p.partial_seconds))):
        raise TypeError("its progress record is malformed")


def restore(ckpt: dict, path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
    """Load a last.pth into the model and optimizer (and the RNGs); return the run's progress."""
    try:
        progress = Progress(**ckpt["progress"])
        _check_progress(progress)
        unwrap(model).load_state_dict(clean_state_dict(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
    except (TypeError, KeyError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    return progress


def resolve_config(given: dict, resume: str | None) -> tuple[TrainConfig, dict | None]:
    """The run's config (and the checkpoint to resume, if any): the flags given, or on --resume the
    checkpoint's config, where only the run-environment flags may differ."""
    if not resume:
        return TrainConfig(**given), None
    ckpt = load_checkpoint(resume)
    if ckpt.get("kind") != "last" or not isinstance(ckpt.get("progress"), dict):
        raise CheckpointError(f"{resume}: not a last.pth (it holds no run progress); --resume takes the "
                              "last.pth that a run writes every epoch")
    saved = ckpt["config"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if not set(saved) <= names:
        raise CheckpointError(f"{resume}: its config has fields this train.py does not know: "
                              f"{', '.join(sorted(map(str, set(saved) - names)))}")
    for key, value in given.items():
        if key not in RUN_ENVIRONMENT and value != saved.get(key):
            raise UsageError(f"--{key.replace('_', '-')} {value} differs from the resumed run's {saved.get(key)}; "
                             "a resumed run keeps its recipe (only --epochs and where it runs may change)")
    try:
        return TrainConfig(**{**saved, **given}), ckpt
    except TypeError as e:
        raise CheckpointError(f"{resume}: its config is unusable ({e})") from None


# ----------------------------------------------------------------------------- the run

def fit(cfg: TrainConfig, *, resume: str | None = None, resume_ckpt: dict | None = None, overwrite: bool = False,
        dist: Distributed | None = None) -> int:
    dist = dist or Distributed()
    device = pick_device(cfg.device)
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly "
                         f"over {dist.world_size} processes")
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, cfg.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    progress = Progress()
    if resume_ckpt is not None:
        progress = restore(resume_ckpt, resume, model, optimizer)
    if dist.is_main:
        prepare_output(out, resuming_run=progress.run_id if resume_ckpt else None, overwrite=overwrite)

    data = load_cifar10(cfg.data_dir)
    train_idx, val_idx = split_train_val(data.train_labels, cfg.val_size, cfg.subset)
    if cfg.val_size:
        sel_images, sel_labels, sel_name = data.train_images[val_idx], data.train_labels[val_idx], "val"
    else:
        sel_images, sel_labels, sel_name = data.test_images, data.test_labels, "test"
    workers = default_workers(device) if cfg.workers == -1 else cfg.workers
    loader = TorchvisionLoader(data.train_images[train_idx], data.train_labels[train_idx],
                               cfg.batch_size // dist.world_size, seed=cfg.seed, workers=workers,
                               device=device, rank=dist.rank, world_size=dist.world_size)
    sel_loader = make_eval_loader(sel_images, sel_labels, EVAL_BATCH, workers=workers, device=device,
                                  rank=dist.rank, world_size=dist.world_size)

    best_weights = None
    if resume_ckpt and cfg.reload_best and progress.best_epoch:
        best = load_checkpoint(out / BEST_NAME)
        if best.get("run_id") != progress.run_id or best.get("epoch") != progress.best_epoch:
            raise CheckpointError(f"{out / BEST_NAME}: not the best checkpoint of the run being resumed "
                                  f"(expected epoch {progress.best_epoch} of run {progress.run_id})")
        best_weights = {k: v.to(device) for k, v in clean_state_dict(best["model"]).items()}

    say = print if dist.is_main else (lambda *a, **k: None)
    say(f"training {cfg.arch} on {len(train_idx)} images, selecting on {len(sel_labels)} {sel_name} images"
        f"{' (the paper protocol: optimistic)' if not cfg.val_size else ''}; device {device}, "
        f"{dist.world_size} process(es), {workers} worker(s); run {progress.run_id}")
    if device.type == "cpu":
        say(f"note: no GPU in use; on 2 CPU cores one epoch of 45,000 images takes about {CPU_EPOCH_MINUTES} min "
            f"(the paper's 100 epochs about {CPU_EPOCH_MINUTES * 100 / 60:.0f} h)")

    with StopFlag() as stop:
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch + 1
            loader.set_epoch(epoch, progress.step)
            sums = torch.tensor(progress.partial, device=device)
            start = time.perf_counter()
            try:
                step = train_one_epoch(model, loader, optimizer, device, amp=cfg.amp,
                                       channels_last=cfg.channels_last, stop=stop, sums=sums,
                                       start_step=progress.step, desc=f"epoch {epoch}/{cfg.epochs}",
                                       show_progress=dist.is_main)
            except NonFiniteLoss:
                raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch}; stopped. "
                                    f"{out / LAST_NAME} still holds the state after epoch {progress.epoch}; "
                                    "try a lower --lr") from None
            seconds = progress.partial_seconds + time.perf_counter() - start
            if step < loader.steps_per_epoch:  # stopped by a signal in the middle of the epoch
                progress.step, progress.partial, progress.partial_seconds = step, sums.tolist(), seconds
                if dist.is_main:
                    save_checkpoint(_last_state(cfg, progress, model, optimizer), out / LAST_NAME)
                say(f"stopped by signal {stop.signal} in epoch {epoch} at step {step}/{loader.steps_per_epoch}; "
                    f"saved {out / LAST_NAME}; continue with: python train.py --resume {out / LAST_NAME}")
                return 128 + stop.signal

            loss_sum, correct, n = dist.all_reduce_sum(sums).tolist()
            val = evaluate(model, sel_loader, device, amp=cfg.amp, channels_last=cfg.channels_last,
                           reduce=dist.all_reduce_sum)
            seconds = progress.partial_seconds + time.perf_counter() - start
            improved = val["acc"] > progress.best_acc
            reloaded = False
            progress.epoch, progress.step, progress.partial, progress.partial_seconds = epoch, 0, [0.0, 0.0, 0.0], 0.0
            if improved:
                progress.best_acc, progress.best_epoch = val["acc"], epoch
                best_weights = {k: v.detach().clone() for k, v in clean_state_dict(unwrap(model).state_dict()).items()}
            elif cfg.reload_best and best_weights is not None:
                unwrap(model).load_state_dict(best_weights)
                progress.reloads += 1
                reloaded = True
            row = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": 100 * correct / n,
                   "val_loss": val["loss"], "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(seconds, 2), "improved": improved, "reloaded": reloaded}
            progress.history.append(row)
            if dist.is_main:
                if improved:
                    save_checkpoint(_best_state(cfg, progress, {k: v.cpu() for k, v in best_weights.items()},
                                                row), out / BEST_NAME)
                save_checkpoint(_last_state(cfg, progress, model, optimizer), out / LAST_NAME)
                _write_json(progress.history, out / HISTORY_NAME)
            say(f"epoch {epoch:>3}/{cfg.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}% | "
                f"{sel_name} loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}% | lr {row['lr']:.4f} | "
                f"{seconds:6.1f}s | {'best' if improved else 'reloaded best' if reloaded else ''}")
            if stop.requested:
                say(f"stopped by signal {stop.signal} after epoch {epoch}; continue with: "
                    f"python train.py --resume {out / LAST_NAME}")
                return 128 + stop.signal

    if dist.is_main and progress.history:
        written = plots.save_curves(progress.history, out, sel_name)
        total = sum(h["seconds"] for h in progress.history)
        reload_note = (f"best-weights reload on: reloaded after {progress.reloads} of {progress.epoch} epochs"
                       if cfg.reload_best else "best-weights reload off")
        say(f"done: {progress.epoch} epochs in {total / 60:.1f} min; best {sel_name} acc {progress.best_acc:.2f}% "
            f"at epoch {progress.best_epoch} -> {out / BEST_NAME}; {reload_note}; "
            f"plots: {', '.join(str(p) for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    given, args = parse_args(argv)
    resume = getattr(args, "resume", None)
    try:
        cfg, resume_ckpt = resolve_config(given, resume)
        return fit(cfg, resume=resume, resume_ckpt=resume_ckpt, overwrite=getattr(args, "overwrite", False))
    except (UsageError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once; the last checkpoint written stays", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
