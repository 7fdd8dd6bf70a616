"""What a run writes where, and how it is resumed: the names of its files in --out, the lock that
keeps --out to one run at a time, the progress record in last.pth, the checks that --out is
writable and holds no other run's checkpoints, and the repair on resume of what a crash between
two writes left behind (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from files import lock
from files.writes import WriteError, check_folder, remove_stale_temporaries, replaced, size_text
from training.checkpoint import (
    CheckpointError,
    checkpoint_size,
    clean_state_dict,
    load_checkpoint,
    save_checkpoint,
    unwrap,
)
from training.config import TrainConfig, UsageError
from training.ema import WeightAverage
from training.runtime import (
    Distributed,
    rng_state,
    set_rng_state,
)

BEST_NAME = "learn_rate_consistent_model.pth"  # the paper's file name for the best model
LAST_NAME = "last.pth"
HISTORY_NAME = "history.json"
HISTORY_NUMBERS = ("epoch", "train_loss", "train_acc", "seconds")  # plotted and summed per row
SELECTION_KEYS = ("val_loss", "val_acc")  # null in a history row after an epoch not evaluated (--eval-every)


@contextlib.contextmanager
def holding_out(out: str, dist: Distributed) -> Iterator[None]:
    """--out for this run alone while the block runs: rank 0 holds its lock (files/lock.py); a
    folder that another live process holds stops every rank together, before any data is read."""
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main:
            try:
                stack.enter_context(lock.hold(out, "--out"))
            except lock.FolderInUse as e:
                error = e
        error = dist.first_error(error)
        if error:
            raise error if isinstance(error, Exception) else lock.FolderInUse(error)
        yield


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

    def check(self) -> None:
        ints = (self.epoch, self.step, self.best_epoch, self.reloads)
        numbers = (*self.partial, self.best_acc, self.partial_seconds) if isinstance(self.partial, list) else ()
        rows_ok = isinstance(self.history, list) and all(
            isinstance(row, dict) and all(type(row.get(k)) in (int, float) for k in HISTORY_NUMBERS)
            and all(k in row and type(row[k]) in (int, float, type(None)) for k in SELECTION_KEYS)
            for row in self.history)
        if not (all(type(v) is int and v >= 0 for v in ints) and rows_ok and isinstance(self.run_id, str)
                and len(numbers) == 5 and all(isinstance(v, (int, float)) for v in numbers)):
            raise TypeError("its progress record is malformed")


def last_state(cfg: TrainConfig, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
                ema: WeightAverage | None) -> dict:
    state = {"kind": "last", "config": dataclasses.asdict(cfg), "progress": dataclasses.asdict(progress),
             "model": clean_state_dict(unwrap(model).state_dict()), "optimizer": optimizer.state_dict(),
             "epoch": progress.epoch, "rng": rng_state(), "torch_version": str(torch.__version__)}
    if ema is not None:
        state["ema"] = ema.state_dict()  # its tensors are covered by the checkpoint's SHA-256 like the model's
    return state


def best_state(cfg: TrainConfig, progress: Progress, weights: dict, metrics: dict) -> dict:
    return {"kind": "best", "config": dataclasses.asdict(cfg), "run_id": progress.run_id,
            "model": {k: v.cpu() for k, v in weights.items()}, "epoch": progress.epoch, "metrics": metrics,
            "history": progress.history, "torch_version": str(torch.__version__)}


def write_json(obj, path: Path) -> None:
    with replaced(path, "the history") as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def last_pth_size(cfg: TrainConfig, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
                  ema: WeightAverage | None) -> int:
    """About the bytes of this run's last.pth: its state now, plus the optimizer's per-parameter
    buffers (SGD's momentum, AdamW's two moments) where the first step has not made them yet."""
    slots = 0 if optimizer.state else 2 if cfg.optimizer == "adamw" else int(cfg.momentum > 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return checkpoint_size(last_state(cfg, progress, model, optimizer, ema)) + slots * params


def prepare_output(out: Path, *, resuming_run: str | None, overwrite: bool, last_size: int = 0) -> None:
    """Make sure --out is writable, has room for the end of an epoch (a new last.pth of `last_size`
    bytes and a temporary copy of it, less the last.pth it replaces; the best checkpoint, the model
    alone, fits in that) and holds no other run's checkpoints (unless --overwrite)."""
    for path in remove_stale_temporaries(out):
        print(f"note: removed {path}, left by a write that was killed before it ended")
    present = (out / LAST_NAME).stat().st_size if (out / LAST_NAME).is_file() else 0
    try:
        check_folder(out, max(last_size, 2 * last_size - present), f"an epoch's checkpoints ({LAST_NAME} is "
                     f"about {size_text(last_size)}, written through a temporary copy)")
    except WriteError as e:
        raise UsageError(f"cannot write to --out {out}: {e.why}; {e.remedy}") from None
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


def free_default_out(out: Path) -> str:
    """The default --out (model/) unless it holds checkpoints already (the shipped model, or an
    earlier run's): then a new folder under runs/, said in one line, so that a plain
    `python train.py` neither replaces them nor stops."""
    taken = [name for name in (BEST_NAME, LAST_NAME) if (out / name).exists()]
    if not taken:
        return str(out)
    new = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    resume = f"; --resume {out / LAST_NAME} continues that run" if LAST_NAME in taken else ""
    print(f"note: {out}/ already holds {', '.join(taken)}; this run writes to {new}/ instead "
          f"(--out {out} --overwrite replaces them{resume})")
    return str(new)


def saved_at(progress: Progress) -> str:
    """Where a last.pth with this progress stands, in words."""
    return f"epoch {progress.epoch}" + (f" and {progress.step} steps of the next" if progress.step else "")


def load_resume(path: str) -> dict:
    """Load a last.pth for --resume, or say why it cannot be resumed from."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "last" or not isinstance(ckpt.get("progress"), dict):
        raise CheckpointError(f"{path}: not a last.pth (it holds no run progress); --resume takes the "
                              "last.pth that a run writes every epoch")
    return ckpt


def restore(ckpt: dict, path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            ema: WeightAverage | None) -> Progress:
    """Load a last.pth's state into the model, the optimizer, the weight average and the RNGs;
    return the run's progress."""
    if ema is not None and "ema" not in ckpt:
        raise CheckpointError(f"{path}: holds no weight average though its config has --ema {ema.decay:g}; "
                              "the file is damaged")
    try:
        progress = Progress(**ckpt["progress"])
        progress.check()
        unwrap(model).load_state_dict(clean_state_dict(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
    except (TypeError, KeyError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    return progress


def finish_best_write(cfg: TrainConfig, out: Path, progress: Progress, model: nn.Module) -> bool:
    """Write the best checkpoint again if the run stopped between last.pth and it: then last.pth's
    epoch is the best one and `model` (the one evaluated: the weight average with --ema) holds the
    best weights. Returns whether it wrote."""
    row = next((h for h in progress.history if h["epoch"] == progress.best_epoch), None)
    if progress.step or progress.best_epoch != progress.epoch or row is None:
        return False
    try:
        best = load_checkpoint(out / BEST_NAME)
        if best.get("run_id") == progress.run_id and best.get("epoch") == progress.best_epoch:
            return False
    except CheckpointError:
        pass  # missing or half-written: write it
    weights = clean_state_dict(unwrap(model).state_dict())
    save_checkpoint(best_state(cfg, progress, weights, row), out / BEST_NAME)
    return True


def load_best_weights(out: Path, progress: Progress, model: nn.Module, device: torch.device) -> dict:
    """The resumed run's best weights: the model's own if the epoch it stopped after was the best
    (last.pth holds them then), else its best checkpoint's (checked to be that run's)."""
    if progress.best_epoch == progress.epoch and not progress.step:
        return {k: v.detach().clone() for k, v in clean_state_dict(unwrap(model).state_dict()).items()}
    best = load_checkpoint(out / BEST_NAME)
    if best.get("run_id") != progress.run_id or best.get("epoch") != progress.best_epoch:
        raise CheckpointError(f"{out / BEST_NAME}: not the best checkpoint of the run being resumed "
                              f"(expected epoch {progress.best_epoch} of run {progress.run_id})")
    return {k: v.to(device) for k, v in clean_state_dict(best["model"]).items()}


def check_output(cfg: TrainConfig, progress: Progress, resume: str | None, overwrite: bool, model: nn.Module,
                 dist: Distributed, last_size: int) -> None:
    """Rank 0 checks --out and, on a resume, brings the outputs a crash may have left behind up to
    last.pth; all processes stop together if either fails."""
    out, error = Path(cfg.out), None
    if dist.is_main:
        try:
            prepare_output(out, resuming_run=progress.run_id if resume else None, overwrite=overwrite,
                           last_size=last_size)
            if resume and finish_best_write(cfg, out, progress, model):
                print(f"note: {out / BEST_NAME} was not written when the run stopped; written now from {resume}")
            if resume:
                write_json(progress.history, out / HISTORY_NAME)
        except WriteError as e:
            error = e.explained(f"{resume} holds the state after {saved_at(progress)}",
                                f"continue with: python train.py --resume {resume}")
        except UsageError as e:
            error = e
    error = dist.first_error(error)
    if error:
        raise error
