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
logs the run for TensorBoard (tensorboard_log.py, docs/tensorboard.md). With --ema DECAY an
exponential moving average of the weights (ema.py) is what is evaluated and saved as the best.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import plots
from checkpoint import CheckpointError, checkpoint_size, clean_state_dict, load_checkpoint, save_checkpoint, unwrap
from config import TrainConfig, UsageError, fresh_config, lr_at, parse_args, resolution_at, resumed_config
from data import (
    CLASSES,
    DataError,
    DeviceLoader,
    TorchvisionLoader,
    augmented_examples,
    default_workers,
    load_cifar10,
    make_eval_loader,
    split_train_val,
)
from distill import load_teachers, training_loss
from ema import WeightAverage
from evaluate import SELECTION_KEYS, evaluate, predict
from model import build_model
from optim import make_optimizer
from policy_workers import default_policy_workers
from runtime import (
    Distributed,
    StopFlag,
    close_distributed,
    compile_model,
    convert_sync_batchnorm,
    default_amp,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
    use_deterministic_algorithms,
    wrap_ddp,
)
from step import EagerStep, make_step
from tensorboard_log import TensorBoardLog, folder_for, require_tensorboard
from writes import WriteError, check_folder, remove_stale_temporaries, replaced, size_text

BEST_NAME = "learn_rate_consistent_model.pth"  # the paper's file name for the best model
LAST_NAME = "last.pth"
HISTORY_NAME = "history.json"
HISTORY_NUMBERS = ("epoch", "train_loss", "train_acc", "seconds")  # plotted and summed per row
EVAL_BATCH = 500  # images per evaluation batch: no gradients, so larger than the training batch


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


def _last_state(cfg: TrainConfig, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
                ema: WeightAverage | None) -> dict:
    state = {"kind": "last", "config": dataclasses.asdict(cfg), "progress": dataclasses.asdict(progress),
             "model": clean_state_dict(unwrap(model).state_dict()), "optimizer": optimizer.state_dict(),
             "epoch": progress.epoch, "rng": rng_state(), "torch_version": str(torch.__version__)}
    if ema is not None:
        state["ema"] = ema.state_dict()  # its tensors are covered by the checkpoint's SHA-256 like the model's
    return state


def _best_state(cfg: TrainConfig, progress: Progress, weights: dict, metrics: dict) -> dict:
    return {"kind": "best", "config": dataclasses.asdict(cfg), "run_id": progress.run_id,
            "model": {k: v.cpu() for k, v in weights.items()}, "epoch": progress.epoch, "metrics": metrics,
            "history": progress.history, "torch_version": str(torch.__version__)}


def _write_json(obj, path: Path) -> None:
    with replaced(path, "the history") as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def last_pth_size(cfg: TrainConfig, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
                  ema: WeightAverage | None) -> int:
    """About the bytes of this run's last.pth: its state now, plus the optimizer's per-parameter
    buffers (SGD's momentum, AdamW's two moments) where the first step has not made them yet."""
    slots = 0 if optimizer.state else 2 if cfg.optimizer == "adamw" else int(cfg.momentum > 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return checkpoint_size(_last_state(cfg, progress, model, optimizer, ema)) + slots * params


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
    save_checkpoint(_best_state(cfg, progress, weights, row), out / BEST_NAME)
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


def cuda_graph_problem(cfg: TrainConfig, device: torch.device, distributed: bool = False) -> str | None:
    """Why the training step cannot be recorded as a CUDA graph in this run (None: it can). With
    --compile the compiled model's kernels are what the graph records (measured faster than either
    alone: README, "Speed on a GPU")."""
    if device.type != "cuda":
        return "it needs a CUDA device"
    if cfg.schedule != "constant":
        return "the graph records the learning rate, so it needs --schedule constant"
    if distributed:
        return "it runs in a single process, not under torchrun"
    if cfg.min_res < 32:
        return "progressive resizing (--min-res) changes the shape of the batches"
    if cfg.teacher:
        return "a teacher's forward inside the recorded step is not yet checked on a GPU (--teacher)"
    if cfg.ema:
        # Not yet shown on a GPU to give the eager run's average (one comparison disagreed on a
        # BatchNorm statistic): until it is, the weight average trains eagerly.
        return "the weight average (--ema) is checked with eager steps only"
    return None


def platform_defaults(cfg: TrainConfig, device: torch.device, distributed: bool = False) -> TrainConfig:
    """Fill the settings left to the platform (None) with what measured faster there (README)."""
    graph_problem = cuda_graph_problem(cfg, device, distributed)
    if cfg.cuda_graph and graph_problem:
        raise UsageError(f"--cuda-graph: {graph_problem}; run without --cuda-graph")
    return dataclasses.replace(
        cfg,
        amp=default_amp(device)[0] if cfg.amp is None else cfg.amp,
        channels_last=True if cfg.channels_last is None else cfg.channels_last,
        cuda_graph=graph_problem is None if cfg.cuda_graph is None else cfg.cuda_graph,
    )


# ----------------------------------------------------------------------------- the run

def build_loaders(cfg: TrainConfig, device: torch.device, dist: Distributed):
    """The training loader and the selection-split loader, what the selection split is, and a
    function giving a few augmented training images (uint8) to look at."""
    data = load_cifar10(cfg.data_dir)
    train_idx, val_idx = split_train_val(data.train_labels, cfg.val_size, cfg.subset)
    if cfg.val_size:
        sel_images, sel_labels, sel_name = data.train_images[val_idx], data.train_labels[val_idx], "val"
    else:
        sel_images, sel_labels, sel_name = data.test_images, data.test_labels, "test"
    workers = default_workers(device) if cfg.workers == -1 else cfg.workers
    on_device = cfg.loader == "device"
    if (cfg.cutout or cfg.flip != "random") and not on_device:
        raise UsageError("--cutout and --flip alternate are done by the device loader; drop --loader torchvision "
                         "or them")
    common = {"seed": cfg.seed, "device": device, "rank": dist.rank, "world_size": dist.world_size,
              "rotation": cfg.rotation, "policy": cfg.augment}
    images, labels, local_batch = data.train_images[train_idx], data.train_labels[train_idx], \
        cfg.batch_size // dist.world_size
    policy_workers = default_policy_workers(device, dist.world_size) if cfg.workers == -1 else cfg.workers
    loader = (DeviceLoader(images, labels, local_batch, cutout=cfg.cutout, flip=cfg.flip,
                           policy_workers=policy_workers, **common) if on_device
              else TorchvisionLoader(images, labels, local_batch, workers=workers, **common))
    sel_loader = make_eval_loader(sel_images, sel_labels, EVAL_BATCH, workers=workers, device=device,
                                  rank=dist.rank, world_size=dist.world_size, on_device=on_device)
    every = f" after every {cfg.eval_every} epochs and the last" if cfg.eval_every > 1 else ""
    activation = "" if cfg.activation == "relu" else f" ({cfg.activation})"
    policy = "" if cfg.augment == "none" else f", {cfg.augment}"
    once = cfg.eval_every >= cfg.epochs  # only the last epoch is evaluated: the split chooses nothing
    selecting = (f"testing on {len(sel_labels)} {sel_name} images once, after the last epoch" if once else
                 f"selecting on {len(sel_labels)} {sel_name} images"
                 f"{' (the paper protocol: optimistic)' if not cfg.val_size else ''}{every}")
    summary = (f"training {cfg.arch}{activation} on {len(train_idx)} images, {selecting}; "
               f"{cfg.loader} loader{'' if on_device else f' with {workers} worker(s)'}{policy}"
               f"{f' in {policy_workers} worker(s)' if on_device and policy and policy_workers else ''}")
    examples = functools.partial(augmented_examples, images[:64], cfg.seed, cfg.rotation, cutout=cfg.cutout,
                                 policy=cfg.augment)
    return loader, sel_loader, sel_name, summary, examples


def open_tensorboard(cfg: TrainConfig, run_id: str, dist: Distributed) -> TensorBoardLog:
    """Rank 0's TensorBoard log with --tensorboard (a log that writes nothing otherwise); all
    processes stop together, with one line, if it cannot be opened."""
    if not cfg.tensorboard:
        return TensorBoardLog()
    log, error = TensorBoardLog(), None
    if dist.is_main:
        try:
            require_tensorboard()
            log = TensorBoardLog(folder_for(cfg.tensorboard, run_id))
        except UsageError as e:
            error = str(e)
    error = dist.first_error(error)
    if error:
        raise UsageError(error)
    return log


@dataclass
class Run:
    """Everything one run works with, set up once by `start_run`."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    dist: Distributed
    model: nn.Module  # what trains: maybe compiled, maybe wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    train_step: EagerStep  # forward, backward and optimizer step: eager or a CUDA graph
    loader: DeviceLoader | TorchvisionLoader
    sel_loader: object  # batches of the selection split
    sel_name: str  # "val" or "test"
    progress: Progress
    best_weights: dict | None
    tb: TensorBoardLog  # writes only on rank 0 and with --tensorboard
    ema: WeightAverage | None  # the average of the weights with --ema
    speed_said: bool = False  # whether the speed of the first steps was said
    saved: tuple[Path, str] | None = None  # the newest last.pth of this run, and where it stands

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text)

    def save_last(self) -> None:
        state = _last_state(self.cfg, self.progress, self.model, self.optimizer, self.ema)
        save_checkpoint(state, self.out / LAST_NAME)
        self.saved = (self.out / LAST_NAME, saved_at(self.progress))

    @contextlib.contextmanager
    def telling_failed_writes(self) -> Iterator[None]:
        """A failed write's line gets which last.pth holds what, and how to go on from it."""
        try:
            yield
        except WriteError as e:
            if self.saved is None:
                raise e.explained("no checkpoint of this run was written yet", "start the run again") from None
            path, where = self.saved
            out = f" --out {self.out}" if path.parent != self.out else ""
            elsewhere = "" if e.disk_full else " (and --out DIR to write elsewhere)"
            raise e.explained(f"{path} holds the state after {where}",
                              f"continue with: python train.py --resume {path}{out}{elsewhere}") from None

    def selected_model(self) -> nn.Module:
        """The model evaluated on the selection split and saved as the best: the weight average with
        --ema, else the trained one (outside DDP: no hooks where there is no backward)."""
        if self.ema is not None:
            return self.ema.model
        return self.model.module if self.dist.enabled else self.model

    def lr_schedule(self, epoch: int) -> Callable[[int], float] | None:
        if self.cfg.schedule == "constant":
            return None
        steps = self.loader.steps_per_epoch
        return lambda step: lr_at(self.cfg, (epoch - 1) * steps + step, steps)


def build_training(cfg: TrainConfig, device: torch.device, dist: Distributed,
                   initial_weights: dict | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The seeded model (SyncBatchNorm, channels-last as asked) and its optimizer; the model starts
    from `initial_weights` (a state dict of the config's widths: a pruned network) when given."""
    if cfg.deterministic:
        use_deterministic_algorithms(device)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, cfg.num_classes, cfg.activation, cfg.widths).to(device)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    if cfg.sync_bn and dist.enabled:
        model = convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, make_optimizer(cfg, model, device)


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
                _write_json(progress.history, out / HISTORY_NAME)
        except WriteError as e:
            error = e.explained(f"{resume} holds the state after {saved_at(progress)}",
                                f"continue with: python train.py --resume {resume}")
        except UsageError as e:
            error = e
    error = dist.first_error(error)
    if error:
        raise error


def start_run(cfg: TrainConfig, resume: str | None, resume_ckpt: dict | None, overwrite: bool, dist: Distributed,
              device: torch.device, initial_weights: dict | None = None) -> Run:
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly "
                         f"over {dist.world_size} processes")
    if cfg.ema and cfg.reload_best:
        raise UsageError("--ema and --reload-best: going back to the best weights is not defined for an average "
                         "of the weights; pick one")
    amp_why = (default_amp(device)[1] if cfg.amp is None else "as the resumed run" if resume_ckpt is not None
               else "--amp" if cfg.amp else "--no-amp")
    cfg = platform_defaults(cfg, device, dist.enabled)
    cfg, teachers = load_teachers(cfg, device)  # before the student is seeded; their SHA-256 recorded or checked
    model, optimizer = build_training(cfg, device, dist, None if resume_ckpt is not None else initial_weights)
    ema = WeightAverage(model, cfg.ema, cfg.ema_every) if cfg.ema else None
    progress = restore(resume_ckpt, resume, model, optimizer, ema) if resume_ckpt is not None else Progress()
    check_output(cfg, progress, resume, overwrite, ema.model if ema else model, dist,
                 last_pth_size(cfg, progress, model, optimizer, ema))
    loader, sel_loader, sel_name, summary, examples = build_loaders(cfg, device, dist)
    tb = open_tensorboard(cfg, progress.run_id, dist)  # after the data: a run that cannot start leaves no log
    best_weights = None
    if resume_ckpt and cfg.reload_best and progress.best_epoch:
        best_weights = load_best_weights(Path(cfg.out), progress, model, device)
    if cfg.compile:
        model = compile_model(model, device)
    if dist.enabled:
        model = wrap_ddp(model, device)
    cross_entropy = functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    train_step = make_step(model, optimizer, training_loss(cross_entropy, teachers, cfg), device=device, amp=cfg.amp,
                           channels_last=cfg.channels_last, cuda_graph=cfg.cuda_graph, batch_size=loader.batch_size)
    run = Run(cfg, Path(cfg.out), device, dist, model, optimizer, train_step, loader, sel_loader, sel_name, progress,
              best_weights, tb, ema, saved=(Path(resume), saved_at(progress)) if resume else None)
    ema_note = f"; ema {cfg.ema:g} every {cfg.ema_every} steps" if ema else ""
    kd_note = (f"; distilling from {len(teachers)} teacher(s) at --kd-weight {cfg.kd_weight:g} --kd-temperature "
               f"{cfg.kd_temperature:g}" if teachers else "")
    run.say(f"{summary}; device {device}, {dist.world_size} process(es); amp {cfg.amp} ({amp_why}), channels_last "
            f"{cfg.channels_last}, compile {cfg.compile}, cuda_graph {cfg.cuda_graph}{ema_note}{kd_note}; "
            f"run {progress.run_id}"
            f"{f', resumed after epoch {progress.epoch} step {progress.step}' if resume_ckpt else ''}")
    if tb.writer is not None:
        tb.augmented_images(examples(), progress.epoch)
        run.say(f"TensorBoard: logging to {tb.folder}; view with: tensorboard --logdir {tb.folder.parent}")
    return run


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
                save_checkpoint(_best_state(cfg, progress, run.best_weights, row), run.out / BEST_NAME)
            _write_json(progress.history, run.out / HISTORY_NAME)
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
    run = start_run(cfg, resume, resume_ckpt, overwrite, dist or Distributed(), device, initial_weights)
    with StopFlag() as stop, contextlib.closing(run.tb), contextlib.closing(run.loader), run.telling_failed_writes():
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
