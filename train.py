"""Train ResNet9 on CIFAR-10. With no flags this is the paper's recipe.

    python train.py                                   # ResNet9, SGD lr 0.01 momentum 0.9, batch 64, 100 epochs
    python train.py --data-dir /tmp/cifar10 --epochs 2 --subset 2000   # a quick look
    python train.py --resume model/last.pth           # continue a stopped run exactly where it stopped
    python train.py --recipe fast                     # the same model on a schedule made for speed
    torchrun --nproc_per_node=4 train.py              # data-parallel (DDP); --batch-size stays global

After every epoch the model is evaluated on the selection split (a fixed, class-stratified
hold-out of --val-size training images; the test set with --val-size 0, as the paper did). If its
accuracy beats the best so far the weights are saved to model/learn_rate_consistent_model.pth
and training goes on (--reload-best instead goes back to the best weights after an epoch that did
not improve: the other reading of the paper's sentence; README, "The paper's reload").
model/last.pth holds the full state after every epoch (and at Ctrl-C), history.json the curves'
numbers; loss_curve.png and accuracy_curve.png are drawn at the end. --tensorboard [DIR] also
logs the run for TensorBoard (training/tensorboard_log.py, docs/tensorboard.md). With --ema DECAY
an exponential moving average of the weights (training/ema.py) is evaluated and saved as the best.
Setting the run up (training/run.py) and what it writes where (training/run_files.py) live in the
training package; this file is the loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import CLASSES, DataError
from files.lock import FolderInUse
from files.writes import WriteError
from reports import plots
from training.checkpoint import CheckpointError, clean_state_dict, unwrap
from training.config import TrainConfig, UsageError, fresh_config, parse_args, resolution_at, resumed_config
from training.evaluation import evaluate, predict
from training.run import Run, check_recipe, start_run
from training.run_files import (
    BEST_NAME,
    HISTORY_NAME,
    LAST_NAME,
    free_default_out,
    holding_out,
    load_resume,
    write_json,
)
from training.runtime import Distributed, StopFlag, close_distributed, init_distributed
from training.step import EagerStep


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- one epoch

def _sync_point(sums: torch.Tensor, stop: StopFlag, dist: Distributed, bar: tqdm | None = None,
                on_sync: Callable[[float, float], None] | None = None) -> bool:
    """The loop's only host sync, every few dozen steps: check that the loss is finite, agree
    across processes on stopping, show loss and accuracy, and hand the summed loss and image count
    (all processes') to `on_sync`. Returns whether to stop."""
    shared = dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([float(stop.requested)])]))
    loss_sum, correct, n, stop_votes = shared.tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss
    if bar is not None:
        bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", acc=f"{100 * correct / max(n, 1):.2f}%")
    if on_sync is not None:
        on_sync(loss_sum, n)
    return stop_votes > 0


def train_one_epoch(train_step: EagerStep, loader, *, stop: StopFlag, sums: torch.Tensor, start_step: int = 0,
                    lr_for_step: Callable[[int], float] | None = None, dist: Distributed | None = None,
                    desc: str = "", on_sync: Callable[[int, float, float], None] | None = None,
                    on_speed: Callable[[float, int], None] | None = None,
                    after_step: Callable[[int], None] | None = None) -> int:
    """Train over the loader's remaining steps of this epoch, adding [loss sum, correct, images] of
    this process into `sums` (on the device: no host sync per step). At each sync point
    `on_sync(step, loss sum, images)` gets the epoch's sums so far over all processes.

    Stops after a step when a stop was requested (single process), or at the next sync point where
    all processes agree (torchrun). Returns the step of the epoch reached. `on_speed(images/s, steps)`
    is called once, at the first sync point, with the speed measured since the first step ended
    (that step's one-off costs left out). `after_step(step)` follows each optimizer step (the
    weight average's update)."""
    dist = dist or Distributed()
    train_step.model.train()
    step = start_step
    bar = tqdm(total=loader.images_left * dist.world_size, desc=desc, unit="img", unit_scale=True, leave=False,
               dynamic_ncols=True, mininterval=1.0, disable=None if dist.is_main else True)
    every = max(1, min(50, len(loader) // 10))
    timed_from, timed_images = None, 0
    for x, y in loader:
        if lr_for_step is not None:
            for group in train_step.optimizer.param_groups:
                group["lr"] = lr_for_step(step) * group.get("lr_scale", 1.0)
        y = y.to(sums.device, non_blocking=True)
        loss, logits = train_step(x, y)
        sums[0] += loss.float() * len(y)
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
        step += 1
        if after_step is not None:
            after_step(step)
        bar.update(len(y) * dist.world_size)
        stopping = stop.requested and not dist.enabled
        if timed_from is not None:
            timed_images += len(y) * dist.world_size
        if step % every == 0 or (on_speed and timed_from is None):
            stopping = _sync_point(sums, stop, dist, bar, on_sync and functools.partial(on_sync, step))
            now = time.perf_counter()
            if timed_from is None:
                timed_from = now
            elif on_speed and timed_images:
                on_speed(timed_images / (now - timed_from), step - start_step - 1)
                on_speed = None
        if stopping:
            break
    bar.close()
    _sync_point(sums, stop, dist, on_sync=on_sync and functools.partial(on_sync, step))  # every process reaches it
    return step


# ----------------------------------------------------------------------------- run state


# ----------------------------------------------------------------------------- the run


def say_speed(run: Run, images_per_second: float, steps: int) -> None:
    """The run's expected length, from the speed its first steps measured on this machine."""
    epoch = run.loader.steps_per_epoch * run.cfg.batch_size / images_per_second
    total = epoch * (run.cfg.epochs - run.progress.epoch)
    length = lambda s: f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"
    run.say(f"speed: {images_per_second:,.0f} images/s measured over {steps} steps here: an epoch takes about "
            f"{length(epoch)} of training, the {run.cfg.epochs - run.progress.epoch} epochs left about {length(total)}")


def train_epoch(run: Run, epoch: int, stop: StopFlag) -> tuple[int, list[float], float]:
    """Train (the rest of) one epoch; returns the step reached, the summed [loss, correct, images]
    over all processes, and the seconds spent training in this epoch."""
    progress, cfg = run.progress, run.cfg
    run.loader.set_epoch(epoch, progress.step)
    run.loader.resolution = resolution_at(cfg, epoch)
    # Under torchrun each process adds its own sums; the resumed partial sums count once.
    sums = torch.tensor(progress.partial if run.dist.is_main else [0.0] * 3, device=run.device)
    run.tb.start_epoch(progress.partial)
    first_step = (epoch - 1) * run.loader.steps_per_epoch  # the run's optimizer steps before this epoch
    start = time.perf_counter()
    try:
        on_speed = functools.partial(say_speed, run) if not run.speed_said else None
        run.speed_said = True
        after_step = (lambda step: run.ema.after_step(first_step + step)) if run.ema else None
        step = train_one_epoch(run.train_step, run.loader, stop=stop, sums=sums, start_step=progress.step,
                               dist=run.dist, desc=f"epoch {epoch}/{cfg.epochs}", lr_for_step=run.lr_schedule(epoch),
                               on_sync=lambda step, loss_sum, n: run.tb.sync_loss(first_step + step, loss_sum, n),
                               on_speed=on_speed, after_step=after_step)
    except NonFiniteLoss:
        raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch}; stopped. "
                            f"{run.out / LAST_NAME} still holds the state after epoch {progress.epoch}; "
                            "try a lower --lr") from None
    seconds = progress.partial_seconds + time.perf_counter() - start
    return step, run.dist.all_reduce_sum(sums).tolist(), seconds


def save_mid_epoch(run: Run, step: int, totals: list[float], seconds: float, signum: int) -> int:
    """A stop inside an epoch: save the position and the epoch's sums so far, say how to go on."""
    progress = run.progress
    progress.step, progress.partial, progress.partial_seconds = step, totals, seconds
    if run.dist.is_main:
        run.save_last()
    run.say(f"stopped by signal {signum} in epoch {progress.epoch + 1} at step {step}/{run.loader.steps_per_epoch}; "
            f"saved {run.out / LAST_NAME}; continue with: python train.py --resume {run.out / LAST_NAME}")
    return 128 + signum


def evaluated_after(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the selection split is evaluated after this epoch: every --eval-every epochs, and the last."""
    return epoch % cfg.eval_every == 0 or epoch >= cfg.epochs


def end_epoch(run: Run, epoch: int, totals: list[float], train_seconds: float) -> None:
    """Evaluate on the selection split (the weight average with --ema) when this epoch is one to
    evaluate, keep or reload the best weights, write the checkpoints and the history, and print
    the epoch's line. An epoch not evaluated has no selection numbers (null in the history)."""
    cfg, progress, dist = run.cfg, run.progress, run.dist
    start = time.perf_counter()
    evaluated, val = evaluated_after(cfg, epoch), {"loss": None, "acc": None}
    if evaluated:
        eval_model = run.selected_model()
        dist.broadcast_buffers(unwrap(run.model))
        if run.ema is not None:  # its BatchNorm statistics come from each rank's own images: rank 0's for all
            if cfg.ema_bn == "recompute":
                run.loader.set_epoch(epoch)  # from the epoch's first image, also in a run resumed inside it
                run.loader.resolution = 32
                run.ema.recompute_bn(run.loader, cfg.ema_bn_images // dist.world_size, device=run.device,
                                     amp=cfg.amp, channels_last=cfg.channels_last)
            dist.broadcast_buffers(eval_model)
        val = evaluate(eval_model, run.sel_loader, run.device, amp=cfg.amp, channels_last=cfg.channels_last,
                       tta=cfg.tta, shift=cfg.tta_shift, reduce=dist.all_reduce_sum)
    seconds = train_seconds + time.perf_counter() - start
    improved = evaluated and val["acc"] > progress.best_acc
    reloaded = evaluated and not improved and cfg.reload_best and run.best_weights is not None
    progress.epoch, progress.step, progress.partial, progress.partial_seconds = epoch, 0, [0.0] * 3, 0.0
    if improved:
        progress.best_acc, progress.best_epoch = val["acc"], epoch
        run.best_weights = {k: v.detach().clone() for k, v in clean_state_dict(unwrap(eval_model).state_dict()).items()}
    elif reloaded:
        unwrap(run.model).load_state_dict(run.best_weights)
        progress.reloads += 1
    loss_sum, correct, n = totals
    row = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": 100 * correct / n,
           "val_loss": val["loss"], "val_acc": val["acc"], "lr": run.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 2), "train_seconds": round(train_seconds, 2),
           "images_per_second": round(n / max(train_seconds, 1e-9), 1), "improved": improved, "reloaded": reloaded,
           "resolution": run.loader.resolution}
    progress.history.append(row)
    error = None
    if dist.is_main:  # last.pth first: a crash before the best one is written is repaired on resume
        try:
            run.save_last()
            if improved:
                run.save_best(row)
            write_json(progress.history, run.out / HISTORY_NAME)
            run.tb.epoch(row, run.sel_name)
        except WriteError as e:
            error = e
    error = dist.first_error(error)  # a failed write stops every process here, rather than leave them waiting
    if error:
        raise error
    note = "best" if improved else "reloaded best" if reloaded else ""
    if cfg.min_res < 32:
        note = f"{row['resolution']} px {note}".rstrip()
    selection = (f"{run.sel_name} loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%" if evaluated
                 else f"{run.sel_name} (not evaluated)".ljust(len(run.sel_name) + 24))
    run.say(f"epoch {epoch:>3}/{cfg.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}% | "
            f"{selection} | lr {row['lr']:.4f} | {seconds:6.1f}s ({train_seconds:.1f}s training) | {note}")


def selection_confusion(run: Run) -> np.ndarray:
    """The confusion matrix (rows: true class) of the model as it is now on the whole selection split,
    each process counting its share; evaluated as end_epoch evaluates (amp, channels-last, TTA)."""
    k, cfg = len(CLASSES), run.cfg
    logits, labels = predict(run.selected_model(), run.sel_loader, run.device, amp=cfg.amp,
                             channels_last=cfg.channels_last, tta=cfg.tta, shift=cfg.tta_shift)
    counts = torch.bincount(labels * k + logits.argmax(1), minlength=k * k).to(run.device)
    return run.dist.all_reduce_sum(counts).reshape(k, k).cpu().numpy()


def log_final(run: Run) -> None:
    """TensorBoard at the end: the confusion matrix of the selection split and the hyperparameters
    with the final metrics. Every process takes part (each counts its share of the split)."""
    progress, cfg, sel = run.progress, run.cfg, run.sel_name
    if cfg.num_classes == len(CLASSES):
        which = (f"best weights (epoch {progress.best_epoch})" if cfg.reload_best
                 else f"the weight average after epoch {progress.epoch}" if cfg.ema
                 else f"last epoch's weights (epoch {progress.epoch})")
        run.tb.confusion_matrix(selection_confusion(run), CLASSES, sel, progress.epoch, which)
    else:
        run.say(f"note: TensorBoard: no confusion matrix for --num-classes {cfg.num_classes} (CIFAR-10 has 10)")
    last = progress.history[-1]
    metrics = {
        f"hparam/best_{sel}_acc": progress.best_acc, "hparam/best_epoch": progress.best_epoch,
        f"hparam/final_{sel}_acc": last["val_acc"], f"hparam/final_{sel}_loss": last["val_loss"],
        "hparam/final_train_acc": last["train_acc"], "hparam/final_train_loss": last["train_loss"],
        "hparam/minutes": sum(h["seconds"] for h in progress.history) / 60}
    # The last epoch is always evaluated, but a run resumed with --epochs at an epoch that was not has none.
    run.tb.hparams(dataclasses.asdict(cfg), {k: v for k, v in metrics.items() if v is not None})


def finish(run: Run) -> None:
    """The curves and the summary line (and the TensorBoard summary), at the end of the run."""
    progress, cfg = run.progress, run.cfg
    if cfg.tensorboard and progress.history:
        log_final(run)  # a failed write raises on rank 0 after the last collective: the others end as they would
    if not (run.dist.is_main and progress.history):
        return
    written = plots.save_curves(progress.history, run.out, run.sel_name)
    total = sum(h["seconds"] for h in progress.history)
    reload_note = (f"best-weights reload on: reloaded after {progress.reloads} of {progress.epoch} epochs"
                   if cfg.reload_best else "best-weights reload off")
    run.say(f"done: {progress.epoch} epochs in {total / 60:.1f} min; best {run.sel_name} acc "
            f"{progress.best_acc:.2f}% at epoch {progress.best_epoch} -> {run.out / BEST_NAME}; {reload_note}; "
            f"plots: {', '.join(str(p) for p in written)}")


def fit(cfg: TrainConfig, *, resume: str | None = None, resume_ckpt: dict | None = None, overwrite: bool = False,
        dist: Distributed | None = None, device: torch.device, after_epoch: Callable[[Run], None] | None = None,
        initial_weights: dict | None = None) -> int:
    """Train to cfg.epochs; returns the exit code (128 + signal when a signal stopped the run).
    `after_epoch(run)` is called after each epoch's checkpoints are written (tune.py reports the
    epoch's selection accuracy there, and stops a trial that falls behind by raising). A new run
    starts from `initial_weights` when given (prune.py fine-tunes a pruned network so)."""
    dist = dist or Distributed()
    check_recipe(cfg, dist)
    with holding_out(cfg.out, dist):  # one run per folder: a second is refused before it reads any data
        run = start_run(cfg, resume, resume_ckpt, overwrite, dist, device, initial_weights)
        with StopFlag() as stop, contextlib.closing(run.tb), contextlib.closing(run.loader), \
                run.telling_failed_writes():
            while run.progress.epoch < run.cfg.epochs:
                epoch = run.progress.epoch + 1
                step, totals, seconds = train_epoch(run, epoch, stop)
                if step < run.loader.steps_per_epoch:  # stopped by a signal in the middle of the epoch
                    return save_mid_epoch(run, step, totals, seconds, stop.signal or signal.SIGINT)
                end_epoch(run, epoch, totals, seconds)
                if after_epoch is not None:
                    after_epoch(run)
                if stop.requested:
                    run.say(f"stopped by signal {stop.signal} after epoch {epoch}; continue with: "
                            f"python train.py --resume {run.out / LAST_NAME}")
                    return 128 + stop.signal
            finish(run)
        return 0


def main(argv: list[str] | None = None) -> int:
    given, args = parse_args(argv)
    resume = getattr(args, "resume", None)
    dist = None
    try:
        resume_ckpt = load_resume(resume) if resume else None
        cfg = resumed_config(given, resume_ckpt["config"], resume) if resume_ckpt else fresh_config(given)
        if not resume and "out" not in given and not getattr(args, "overwrite", False):
            cfg = dataclasses.replace(cfg, out=free_default_out(Path(cfg.out)))
        dist, device = init_distributed(cfg.device, cfg.dist_timeout)
        return fit(cfg, resume=resume, resume_ckpt=resume_ckpt, overwrite=getattr(args, "overwrite", False),
                   dist=dist, device=device)
    except (UsageError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FolderInUse as e:
        if dist is None or dist.is_main:  # every process stops with it; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:
        if dist is None or dist.is_main:  # every process stops with it; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "does not have a deterministic implementation" in str(e):  # an op that --deterministic cannot run
            print(f"error: --deterministic: {str(e).split(', but')[0]}; run without --deterministic", file=sys.stderr)
            return 1
        if not (dist and dist.enabled):
            raise
        # A collective that timed out or lost its peers: say so in one line and end this process.
        print(f"error: process {dist.rank}: lost contact with the other processes (one died or hung for "
              f"--dist-timeout {cfg.dist_timeout:g} s): {' '.join(str(e).split())[:200]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted twice: stopped at once; the last checkpoint written stays", file=sys.stderr)
        return 130
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
