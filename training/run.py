"""Setting a run up: the platform's defaults, the loaders, the model and optimizer, the teachers,
the weight average, the resumed state and the checked output folder, gathered in one `Run` that
train.py's loop works with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data import TorchvisionLoader, load_cifar10, split_train_val
from files.writes import WriteError
from model import build_model
from training.checkpoint import save_checkpoint
from training.config import TrainConfig, UsageError, lr_at
from training.device_loader import DeviceLoader, augmented_examples
from training.distill import load_teachers, training_loss
from training.ema import WeightAverage
from training.evaluation import make_eval_loader
from training.optim import make_optimizer
from training.policy_workers import default_policy_workers
from training.run_files import (
    BEST_NAME,
    LAST_NAME,
    Progress,
    best_state,
    check_output,
    last_pth_size,
    last_state,
    load_best_weights,
    restore,
    saved_at,
)
from training.runtime import (
    Distributed,
    compile_model,
    convert_sync_batchnorm,
    default_amp,
    default_workers,
    seed_everything,
    use_deterministic_algorithms,
    wrap_ddp,
)
from training.step import EagerStep, make_step
from training.tensorboard_log import TensorBoardLog, folder_for, require_tensorboard

EVAL_BATCH = 500  # images per evaluation batch: no gradients, so larger than the training batch


def cuda_graph_problem(cfg: TrainConfig, device: torch.device, distributed: bool = False) -> str | None:
    """Why the training step cannot be recorded as a CUDA graph in this run (None: it can). With
    --compile the compiled model's kernels are what the graph records (measured faster than either
    alone: docs/speed.md, "Speed on a GPU")."""
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
    """Fill the settings left to the platform (None) with what measured faster there (docs/speed.md)."""
    graph_problem = cuda_graph_problem(cfg, device, distributed)
    if cfg.cuda_graph and graph_problem:
        raise UsageError(f"--cuda-graph: {graph_problem}; run without --cuda-graph")
    return dataclasses.replace(
        cfg,
        amp=default_amp(device)[0] if cfg.amp is None else cfg.amp,
        channels_last=True if cfg.channels_last is None else cfg.channels_last,
        cuda_graph=graph_problem is None if cfg.cuda_graph is None else cfg.cuda_graph,
    )


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
        state = last_state(self.cfg, self.progress, self.model, self.optimizer, self.ema)
        save_checkpoint(state, self.out / LAST_NAME)
        self.saved = (self.out / LAST_NAME, saved_at(self.progress))

    def save_best(self, row: dict) -> None:
        """The best checkpoint: the best weights, with the epoch's history row as their metrics."""
        save_checkpoint(best_state(self.cfg, self.progress, self.best_weights, row), self.out / BEST_NAME)

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


def check_recipe(cfg: TrainConfig, dist: Distributed) -> None:
    """Refuse settings that cannot go together, before anything is locked, read or written."""
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly "
                         f"over {dist.world_size} processes")
    if cfg.ema and cfg.reload_best:
        raise UsageError("--ema and --reload-best: going back to the best weights is not defined for an average "
                         "of the weights; pick one")


def start_run(cfg: TrainConfig, resume: str | None, resume_ckpt: dict | None, overwrite: bool, dist: Distributed,
              device: torch.device, initial_weights: dict | None = None) -> Run:
    """Everything the loop needs, from a checked recipe, in a folder this process holds."""
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
