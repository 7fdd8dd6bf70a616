"""A run's configuration: one dataclass, its recipes, and the command line generated from it.

`TrainConfig`'s defaults are the paper's recipe; `--recipe fast` swaps in a schedule made for
speed. Every field is a flag; every checkpoint carries the config as a plain dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from data import AUGMENT_POLICIES
from model import ACTIVATIONS, ARCHITECTURES, STANDARD_WIDTHS
from training.device_loader import FLIPS


class UsageError(Exception):
    """A flag or an output folder that cannot work; the message says what to do instead."""


def _check(kind: Callable, ok: Callable[[object], bool], what: str) -> Callable[[str], object]:
    """An argparse `type` that parses with `kind` and rejects values for which `ok` is false.
    `ok` stays on it, so a config read back from a checkpoint is held to the same rule."""
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__, parse.ok = what, ok
    return parse


POSITIVE_INT = _check(int, lambda v: v > 0, "a positive integer")
CLASS_COUNT = _check(int, lambda v: 10 <= v <= 100_000, "an integer in 10..100000 (CIFAR-10's labels go up to 9)")
NONNEG_INT = _check(int, lambda v: v >= 0, "an integer >= 0")
SEED = _check(int, lambda v: abs(v) < 2**62, "an integer between -2**62 and 2**62")  # torch seeds are 64-bit
POSITIVE_FLOAT = _check(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
NONNEG_FLOAT = _check(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION = _check(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
PIXELS = _check(int, lambda v: 0 <= v <= 16, "a number of pixels in 0..16")
DEGREES = _check(float, lambda v: 0 <= v <= 180, "an angle in [0, 180] degrees")
# -1 is how the config holds `auto`; typed as a number it is refused like any other negative count.
WORKERS = _check(lambda s: -1 if s == "auto" else NONNEG_INT(s), lambda v: v >= -1, "'auto' or an integer >= 0")
DEVICE = _check(str, lambda v: v in ("auto", "cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                "auto, cpu, cuda, cuda:N or mps")
SECONDS = _check(float, lambda v: math.isfinite(v) and v > 0, "a positive number of seconds")
RESOLUTION = _check(int, lambda v: 8 <= v <= 32 and v % 4 == 0, "a multiple of 4 in 8..32 pixels")


def _ramp_ok(text: str) -> bool:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        return False
    return 0 <= start <= end <= 1


RAMP = _check(str, _ramp_ok, "two fractions START,END of the run with 0 <= START <= END <= 1")
UNIT = _check(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
FILE = _check(str, lambda v: bool(v), "a file path")
SHA256 = _check(str.lower, lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a SHA-256 (64 hex digits)")
WIDTHS = _check(lambda s: [int(w) for w in s.split(",")] if s.strip() else [],
                lambda v: len(v) in (0, len(STANDARD_WIDTHS)) and all(type(w) is int and 0 < w <= 65536 for w in v),
                f"{len(STANDARD_WIDTHS)} comma-separated channel counts (or '' for the standard ones)")


def _field(default, help: str, type: Callable | None = None, **extra):
    return field(default=default, metadata={"help": help, "type": type, **extra})


# A field holding a list (a list, not a tuple: it stays one through a checkpoint, JSON and the CLI).
def _list_field(help: str, type: Callable, shown: str, **extra):
    return field(default_factory=list, metadata={"help": help, "type": type, "shown": shown, **extra})


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the paper's recipe. `None` means: chosen per platform."""

    recipe: str = _field("paper", "paper: the paper's recipe; fast: a schedule made for speed; best: made for "
                         "accuracy within the paper's 100 epochs (docs/training.md)", str,
                         choices=("paper", "fast", "best"))
    arch: str = _field("resnet9", "model architecture", str, choices=ARCHITECTURES)
    activation: str = _field("relu", "the nonlinearity after each BatchNorm and residual sum (no parameters: the "
                             "count stays the same)", str, choices=tuple(ACTIVATIONS))
    num_classes: int = _field(10, "number of classes", CLASS_COUNT)
    widths: list[int] = _list_field(  # noqa: RUF009 (a field with a default_factory)
        "the network's channel counts, per stage: its first convolution's, then its "
        "output's (stage 1's is the stem's too), as prune.py writes them; the paper's are "
        f"{','.join(map(str, STANDARD_WIDTHS))}", WIDTHS, "the paper's")
    epochs: int = _field(100, "passes over the training images", POSITIVE_INT)
    batch_size: int = _field(64, "images per optimizer step, summed over all processes", POSITIVE_INT)
    optimizer: str = _field("sgd", "sgd: SGD with momentum (the paper's); adamw: AdamW, with --momentum as its beta1",
                            str, choices=("sgd", "adamw"))
    lr: float = _field(0.01, "learning rate (the peak, under a schedule)", POSITIVE_FLOAT)
    schedule: str = _field("constant", "learning rate over the run: constant, or linear warm-up then linear "
                           "decay to 0", str, choices=("constant", "linear"))
    warmup: float = _field(0.0, "fraction of the run spent warming up linearly (schedule linear)", FRACTION)
    momentum: float = _field(0.9, "SGD momentum; AdamW's beta1 (its beta2 stays 0.999)", FRACTION)
    nesterov: bool = _field(False, "Nesterov momentum (SGD only)")
    weight_decay: float = _field(0.0, "weight decay: L2 with SGD, decoupled with AdamW", NONNEG_FLOAT)
    bn_bias_lr_scale: float = _field(1.0, "learning rate multiplier of BatchNorm's biases (their weight decay is "
                                     "divided by it)", POSITIVE_FLOAT)
    bn_freeze_weight: bool = _field(False, "keep BatchNorm's weights (scales) at their initial 1")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy", FRACTION)
    teacher: list[str] = _list_field(  # noqa: RUF009 (a field with a default_factory)
        "a checkpoint to distil from: the student learns its logits too (distill.py); repeat the flag for several "
        "teachers, whose logits are averaged", FILE, "none", action="append")
    teacher_sha256: list[str] = _list_field(  # noqa: RUF009 (a field with a default_factory)
        "the SHA-256 of each --teacher file, in order: computed at the start where not given, recorded in the "
        "config and checked on --resume", SHA256, "computed", action="append")
    kd_weight: float = _field(0.5, "A: with --teacher the loss is (1 - A)·CE + A·T²·KL(teacher ‖ student)", UNIT)
    kd_temperature: float = _field(4.0, "T: the softmax temperature of the teacher and the student in the "
                                   "distillation term", POSITIVE_FLOAT)
    rotation: float = _field(10.0, "random rotation range, +- degrees (0: none)", DEGREES)
    cutout: int = _field(0, "side of a square blanked at a random place of each training image, pixels (0: none; "
                         "device loader)", PIXELS)
    flip: str = _field("random", "horizontal flips: random (a coin per image and epoch, the paper's), or alternate "
                       "(random in the first epoch, then the other side every epoch; device loader)", str,
                       choices=FLIPS)
    augment: str = _field("none", "automatic augmentation policy for each training image, before cutout: none, or "
                          "trivialaugment (TrivialAugment Wide: one of 14 operations at a random strength)", str,
                          choices=AUGMENT_POLICIES)
    min_res: int = _field(32, "progressive resizing: train the first epochs on images scaled down to this many "
                          "pixels a side, rising to 32 between --res-ramp (fractions of the run); 32: off",
                          RESOLUTION)
    res_ramp: str = _field("0.25,0.75", "progressive resizing: the fractions of the run where the resolution starts "
                           "to rise from --min-res and where it reaches 32", RAMP)
    tta: bool = _field(False, "evaluate with horizontal-flip test-time augmentation")
    tta_shift: int = _field(0, "with --tta, also average the image and its mirror image shifted by this many pixels "
                            "diagonally, both ways: 6 views (0: 2 views)", PIXELS)
    seed: int = _field(0, "seed of the initial weights, the shuffling and the augmentation", SEED)
    val_size: int = _field(5000, "training images held out to pick the best epoch; 0 picks on the test set "
                           "as the paper did (optimistic)", NONNEG_INT)
    subset: int = _field(0, "train on this many images only (0: all)", NONNEG_INT)
    eval_every: int = _field(1, "evaluate on the selection split every this many epochs, and after the last one; "
                             "the epochs between have no selection numbers and cannot be picked as the best",
                             POSITIVE_INT)
    reload_best: bool = _field(False, "after an epoch that did not improve, go back to the best weights (a reading "
                               "of the paper that pins training to its best epoch; off: the best model is saved "
                               "and training goes on, the reading that gives the paper's curves; README)")
    ema: float = _field(0.0, "exponential moving average of the weights: the decay per --ema-every steps (0: off); "
                        "the average is what is evaluated and saved", FRACTION)
    ema_every: int = _field(5, "optimizer steps between updates of the weight average (--ema)", POSITIVE_INT)
    ema_bn: str = _field("recompute", "the weight average's BatchNorm statistics: recompute (measured anew for the "
                         "averaged weights before each evaluation: swa_utils.update_bn), or copy (the trained model's)",
                         str, choices=("recompute", "copy"))
    ema_bn_images: int = _field(10_000, "training images the BatchNorm statistics are recomputed on (--ema-bn "
                                "recompute)", POSITIVE_INT)
    loader: str = _field("device", "device: data held and augmented on the training device; torchvision: "
                         "the paper's PIL pipeline in DataLoader workers", str, choices=("device", "torchvision"))
    amp: bool | None = _field(None, "bf16 autocast (default: on with CUDA, and on a CPU with native bf16: AMX or "
                              "AVX512-BF16)")
    channels_last: bool | None = _field(None, "channels-last memory format (default: on)")
    compile: bool = _field(False, "torch.compile the model (falls back to eager with a warning where unavailable)")
    cuda_graph: bool | None = _field(None, "record the training step once as a CUDA graph and replay it (default: on "
                                     "with CUDA, one process and the constant schedule, without --ema)")
    deterministic: bool = _field(False, "deterministic algorithms only: bit-identical reruns on one machine, slower; "
                                 "an op without a deterministic kernel stops the run (docs/reliability.md)")
    sync_bn: bool = _field(False, "SyncBatchNorm across processes under torchrun")
    data_dir: str = _field("data", "folder holding cifar-10-batches-py/ (downloaded there if absent)", str)
    out: str = _field("model", "folder for checkpoints, history and plots", str)
    device: str = _field("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", DEVICE)
    workers: int = _field(-1, "DataLoader worker processes of the torchvision loader (auto: up to 8 on a GPU, 1 on "
                          "the CPU) and of the device loader's --augment policy (auto: on a GPU, the cores but one "
                          "per process; on the CPU none, in line); 0: in the main process", WORKERS)
    dist_timeout: float = _field(600.0, "seconds a process waits for the others before the job fails", SECONDS)
    tensorboard: str = _field("", "write TensorBoard logs to this folder; given without one: runs/<run id> "
                              "(docs/tensorboard.md)", str, nargs="?", const="auto", shown="off")


# `--recipe fast`: the same ResNet9 on a schedule made for speed: linear warm-up and decay to 0,
# Nesterov momentum, weight decay, label smoothing, crop-flip-cutout augmentation, and progressive
# resizing: the first 40% of the epochs train on images scaled down to 16 px (a quarter of the
# FLOPs; 2.4x the images/s on a CPU), rising to 32 px by 85% of the run. The lr, batch, cutout and
# label smoothing were chosen by bench/recipe_search.py at 32 px on a GPU (batch 128 at lr 0.1 beat
# 512 at 0.4 and 256 at 0.2); the resizing and the epochs by bench/cpu_fast.py on 2 CPU cores, end to
# end, within 27 minutes (docs/fast-recipe.md). All training images are trained on and the last
# epoch is kept: the test set is evaluated once, after it, plain; `evaluate.py --tta` then gives the
# 6-view figure (the 6-view pass in train.py would repeat it: 50 s on 2 CPU cores).
RECIPES: dict[str, dict] = {
    "paper": {},
    "fast": {"epochs": 22, "batch_size": 128, "lr": 0.1, "schedule": "linear", "warmup": 0.2,
             "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.2, "rotation": 0.0, "cutout": 8,
             "min_res": 16, "res_ramp": "0.4,0.85", "tta": False, "tta_shift": 2, "reload_best": False,
             "val_size": 0, "eval_every": 100},
    # `--recipe best`: the most accurate this network gets within the paper's 100 epochs. The fast
    # recipe's family levels off near 91% on the proxy however long it trains (docs/fast-recipe.md),
    # so this one regularises more, as the strongest public CIFAR recipes for ResNets do: the
    # standard SGD schedule (kuangliu: lr 0.1, Nesterov, weight decay 5e-4 at batch 128), cutout 16
    # (DeVries & Taylor's value for CIFAR-10), TrivialAugment, label smoothing 0.1, a warm-up of 5
    # epochs and a linear decay to 0. All 40,000 training images are trained on and the last epoch
    # is kept: the test set is evaluated once, after the last epoch, and chooses nothing.
    "best": {"epochs": 100, "batch_size": 128, "lr": 0.1, "schedule": "linear", "warmup": 0.05,
             "nesterov": True, "weight_decay": 5e-4, "label_smoothing": 0.1, "rotation": 0.0, "cutout": 16,
             "augment": "trivialaugment", "tta": True, "tta_shift": 2, "reload_best": False, "val_size": 0,
             "eval_every": 100},
}

# Fields a resumed run may change: where and how fast it runs, and how long; not what it computes.
# `deterministic` is one: it picks which kernels compute the same recipe (on the CPU the bits are the
# same with and without it, tested), so a run may be resumed with or without it.
RUN_ENVIRONMENT = {"epochs", "data_dir", "out", "device", "workers", "amp", "channels_last", "compile",
                   "cuda_graph", "dist_timeout", "deterministic", "tensorboard"}


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets one line saying what is wrong, not the whole usage text above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field. Defaults are left out of the namespace, so that the flags a
    user gave can be told apart (they override a recipe, and are checked against a resumed run)."""
    p = OneLineParser(description="Train ResNet9 on CIFAR-10 (defaults: the paper's recipe).",
                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = meta.get("shown", "auto" if f.default is None else f.default)
        help_text = f"{meta['help']} (default: {default})"
        if f.metadata["type"] is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            optional_value = {k: meta[k] for k in ("nargs", "const", "action") if k in meta}  # --tensorboard [DIR]
            p.add_argument(flag, type=meta["type"], choices=meta.get("choices"), help=help_text, **optional_value)
    p.add_argument("--resume", metavar="LAST_PTH", help="continue the run saved in this last.pth")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's checkpoints in --out (default: refuse to start)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """The config fields given on the command line, and the whole namespace."""
    args = get_args_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}, args


def fresh_config(given: dict) -> TrainConfig:
    """A new run's config: the recipe's values, overridden by the flags given."""
    return TrainConfig(**{**RECIPES[given.get("recipe", "paper")], **given})


def _acceptable(f: dataclasses.Field, value) -> bool:
    """Whether a value read back from a checkpoint has its field's type and passes its flag's check."""
    if f.default is None:  # a setting left to the platform: None or a bool
        return value is None or type(value) is bool
    ok = getattr(f.metadata["type"], "ok", lambda v: True)
    if f.default is dataclasses.MISSING:  # a list: checked whole, or item by item where the flag is repeated
        return type(value) is list and (all(map(ok, value)) if f.metadata.get("action") == "append" else ok(value))
    if type(value) is not type(f.default) and not (type(f.default) is float and type(value) is int):
        return False
    return ok(value) and value in f.metadata.get("choices", (value,))


def config_problems(saved: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`name=value` for each known field of a saved config (but `skip`) that no flag would accept."""
    return [f"{f.name}={saved[f.name]!r:.40}" for f in dataclasses.fields(TrainConfig)
            if f.name in saved and f.name not in skip and not _acceptable(f, saved[f.name])]


def resumed_config(given: dict, saved: dict, source: str) -> TrainConfig:
    """A resumed run's config: the saved one; only run-environment flags may differ from it."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(saved) - names
    if unknown:
        raise UsageError(f"{source}: its config has fields this version does not know: "
                         f"{', '.join(sorted(map(str, unknown)))}")
    bad = config_problems(saved)
    if bad:
        raise UsageError(f"{source}: its config holds values no flag accepts ({', '.join(bad)}); the file is damaged")
    for key, value in given.items():
        if key not in RUN_ENVIRONMENT and value != saved.get(key):
            raise UsageError(f"--{key.replace('_', '-')} {value} differs from the resumed run's {saved.get(key)}; "
                             "a resumed run keeps its recipe (only --epochs and where and how fast it runs may change)")
    # Whether to record a CUDA graph is decided again for the machine the run continues on (the same
    # arithmetic either way); bf16 stays as the run began unless --amp/--no-amp is given.
    platform = {"cuda_graph": None}
    try:
        return TrainConfig(**{**saved, **platform, **given})
    except TypeError as e:
        raise UsageError(f"{source}: its config is unusable ({e})") from None


def resolution_at(cfg: TrainConfig, epoch: int) -> int:
    """The side, in pixels, of the training images in epoch `epoch` (1-based): --min-res until the
    --res-ramp start, then rising linearly (in steps of 4 pixels) to 32 at its end, 32 after."""
    if cfg.min_res >= 32:
        return 32
    start, end = (float(v) for v in cfg.res_ramp.split(","))
    done = (epoch - 1) / cfg.epochs  # the fraction of the run before this epoch
    if done >= end:
        return 32
    rise = 0.0 if done < start else (done - start) / (end - start)
    return min(32, cfg.min_res + 4 * round(rise * (32 - cfg.min_res) / 4))


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step `step` (0-based, counted over the whole run)."""
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup * total
    if step < warmup:  # never above the peak, even when the warm-up is shorter than a step
        return cfg.lr * min(1.0, (step + 1) / warmup)
    return cfg.lr * max(0.0, (total - step) / max(1.0, total - warmup))
