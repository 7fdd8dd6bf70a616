"""Structured pruning of a checkpoint to a FLOPs budget, fine-tuned by train.py's own loop.

    python prune.py model/learn_rate_consistent_model.pth --flops 0.5 --out pruned/flops50.pth
    python prune.py model/learn_rate_consistent_model.pth --flops 0.5 --out pruned/flops50.pth \\
        --steps 5 --finetune-epochs 50 --data-dir data                  # iterative, fine-tuned
    python prune.py model/learn_rate_consistent_model.pth --flops 0.5 --out pruned/flops50-kd.pth \\
        --steps 5 --finetune-epochs 50 --teacher model/learn_rate_consistent_model.pth   # parent as teacher

Whole channels are removed, so the pruned network is smaller and faster, not masked: a ResNet9 of
narrower widths (model.py, `--widths`; its channel counts are in its config). torch-pruning's
DependencyGraph finds which channels must go together (the residual sums join the stem, stage 1
and its identity shortcut; each later stage's output and its projection shortcut) and removes them
from every layer they touch. The classes (the linear layer's outputs) are never pruned.

--flops F keeps the fraction F of the given checkpoint's MACs (multiply-accumulates, as
`torch_pruning.utils.count_ops_and_params` counts them for one 32x32 image). Pruning is done in
--steps K steps; step k keeps F**(k/K) of them (each step removes the same share of what is left).
Every step scales the checkpoint's eight widths by one factor, each width rounded to a multiple of
--round-to (default 16, the channel blocks that onnxruntime's and oneDNN's fast convolutions work
on: a 50% network of widths 45, 90, 181, 362 runs no faster there than the unpruned one), the
factor found by bisection so that the MACs reached are the nearest to the step's budget, and
removes from each coupled group of channels the ones --importance ranks lowest.
--finetune-epochs N is the total fine-tuning, split evenly over the steps (the later steps get the
remainder): after each step with epochs of its own, train.py's `fit` trains the pruned network
from its pruned weights, in DIR/step-k/ (--finetune-dir), as an ordinary run: checkpoints,
history, curves; `python train.py --resume DIR/step-k/last.pth` continues it. The next step
prunes that run's best checkpoint. The recipe is the checkpoint's own; train.py flags given here
change it (and --teacher distils, training/distill.py).

--out gets a checkpoint like any other (evaluate.py, export.py and hubconf.py read it), with a
`pruning` record: the parent and its SHA-256, the criterion, the MACs and parameters asked and
reached. torch-pruning comes from requirements-optional.txt (docs/compression.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import train
from data import DataError
from files.lock import FolderInUse, hold
from files.writes import WriteError, check_folder
from model import ResNet, resnet9, widths_of
from training.checkpoint import (
    CheckpointError,
    checkpoint_size,
    clean_state_dict,
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from training.config import (
    NONNEG_INT,
    POSITIVE_INT,
    RECIPES,
    RUN_ENVIRONMENT,
    OneLineParser,
    TrainConfig,
    UsageError,
    parse_args,
)
from training.distill import KD_FLAGS
from training.runtime import pick_device

# The criteria that rank the channels of a coupled group (torch-pruning's importances; the group's
# layers' scores of a channel are averaged):
# l1: the L1 norm of the channel's weights (MagnitudeImportance(p=1));
# bn: the size of its BatchNorm scale (BNScaleImportance, the criterion of "network slimming");
# group: the L2 norm over all of its weights in the group (GroupMagnitudeImportance, DepGraph's).
IMPORTANCES: dict[str, Callable] = {
    "l1": lambda tp: tp.importance.MagnitudeImportance(p=1),
    "bn": lambda tp: tp.importance.BNScaleImportance(),
    "group": lambda tp: tp.importance.GroupMagnitudeImportance(p=2),
}
BISECTIONS = 40  # halvings of the width factor's interval: far below one channel's change in MACs


def require_torch_pruning():
    """The torch_pruning module, or a UsageError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise UsageError("prune.py needs torch-pruning: pip install -r requirements-optional.txt") from None
    return torch_pruning


def kept_fraction(text: str) -> float:
    """--flops: a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1) of the FLOPs to keep")
    return value


def macs_and_params(model: nn.Module) -> tuple[int, int]:
    """MACs of one 32x32 image and the parameter count, as torch-pruning counts them."""
    tp = require_torch_pruning()
    example = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def macs_of_widths(widths: list[int], num_classes: int, activation: str) -> int:
    """The MACs of a ResNet9 of these widths, counted on shapes only (the meta device: no weights made)."""
    with torch.device("meta"):
        return macs_and_params(resnet9(num_classes, activation, widths))[0]


def target_widths(base: list[int], current: list[int], target_macs: float, num_classes: int, activation: str,
                  round_to: int = 1) -> list[int]:
    """The widths nearest to `target_macs`: the parent's widths `base` scaled by one factor (found by
    bisection), then each rounded down or up to a multiple of `round_to` (at least one multiple, at
    most the `current` width), the ups chosen one at a time while they bring the MACs nearer."""
    count = lambda widths: macs_of_widths(widths, num_classes, activation)
    fit = lambda w, now: min(now, max(round_to, w))
    scaled = lambda factor: [fit(round(w * factor), now) for w, now in zip(base, current, strict=True)]
    gap = lambda widths: abs(count(widths) - target_macs)
    low, high = 0.0, 1.0  # MACs grow with the factor: count(low) <= target <= count(high)
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if count(scaled(middle)) <= target_macs else (low, middle)
    factor = min((low, high), key=lambda f: gap(scaled(f)))
    if round_to == 1:
        return scaled(factor)
    widths = [fit(round_to * math.floor(w * factor / round_to), now) for w, now in zip(base, current, strict=True)]
    ups = [fit(round_to * math.ceil(w * factor / round_to), now) for w, now in zip(base, current, strict=True)]
    off = gap(widths)
    while True:
        tries = [widths[:i] + [ups[i]] + widths[i + 1:] for i in range(len(widths)) if widths[i] < ups[i]]
        off_best, best = min(((gap(t), t) for t in tries), key=lambda x: x[0], default=(off, None))
        if best is None or off_best >= off:
            return widths
        off, widths = off_best, best


def width_slots(model: ResNet) -> dict[nn.Module, int]:
    """Each convolution of the ResNet -> the index in `widths` of its output channels."""
    slots: dict[nn.Module, int] = {model.conv1: 1}  # the stem feeds stage 1's identity shortcut
    for i, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for block in stage:
            slots[block.conv1] = 2 * i
            slots[block.conv2] = 2 * i + 1
            slots.update({m: 2 * i + 1 for m in block.shortcut if isinstance(m, nn.Conv2d)})
    return slots


def prune_to(model: ResNet, widths: list[int], importance: str) -> None:
    """Remove, in place, the channels `importance` ranks lowest in each coupled group until the
    network has `widths`; torch-pruning's DependencyGraph removes each from every layer it touches."""
    tp = require_torch_pruning()
    model.eval()
    scorer = IMPORTANCES[importance](tp)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    slots = width_slots(model)
    for group in graph.get_all_groups(ignored_layers=[model.linear], root_module_types=[nn.Conv2d]):
        root = group[0].dep.target.module
        drop = root.out_channels - widths[slots[root]]
        if drop > 0:
            with torch.no_grad():
                scores = scorer(group)
            group.prune(idxs=torch.argsort(scores)[:drop].tolist())
    if widths_of(model) != widths:  # every width is some group's: a mismatch is a bug here, not bad input
        raise RuntimeError(f"pruning reached widths {widths_of(model)}, not {widths}")


def finetune_config(parent: dict, given: dict) -> TrainConfig:
    """The fine-tune's recipe: the parent checkpoint's (but where it ran, and its distillation), a
    --recipe's values when one is given, then the train.py flags given."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    inherited = {k: v for k, v in parent.items()
                 if k in known and k not in RUN_ENVIRONMENT | {"widths", "teacher", "teacher_sha256", *KD_FLAGS}}
    recipe = RECIPES[given["recipe"]] if "recipe" in given else {}
    return TrainConfig(**{**inherited, **recipe, **given})


def epochs_of_step(total: int, steps: int, k: int) -> int:
    """Step k's share of `total` fine-tuning epochs (1-based k; the shares add up to `total`)."""
    return total * k // steps - total * (k - 1) // steps


def check_args(args: argparse.Namespace, given: dict, train_args: argparse.Namespace) -> None:
    if "WORLD_SIZE" in os.environ:
        raise UsageError("prune.py runs in one process, its fine-tunes too: run it without torchrun")
    if hasattr(train_args, "resume"):
        raise UsageError("--resume is train.py's: a stopped fine-tune continues with python train.py --resume "
                         "FINETUNE_DIR/step-K/last.pth")
    if "widths" in given:
        raise UsageError("--widths is what prune.py decides (from --flops); leave it out")
    if "epochs" in given:
        raise UsageError("--epochs: the fine-tune's length is --finetune-epochs (split over the --steps)")
    recipe = sorted(k for k in given if k not in RUN_ENVIRONMENT)
    if not args.finetune_epochs and recipe:
        raise UsageError(f"--{recipe[0].replace('_', '-')} is for the fine-tune, and --finetune-epochs is 0: "
                         "nothing is trained; give --finetune-epochs N or leave it out")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")


def run(args: argparse.Namespace, rest: list[str]) -> int:
    require_torch_pruning()
    given, train_args = parse_args(rest)
    check_args(args, given, train_args)
    finetune_dir = Path(args.finetune_dir or Path(args.out).with_name(f"{Path(args.out).stem}-finetune"))
    with hold(finetune_dir, "--finetune-dir") if args.finetune_epochs else contextlib.nullcontext():
        return prune_and_finetune(args, given, finetune_dir)  # one writer per fine-tune folder, as train.py


def prune_and_finetune(args: argparse.Namespace, given: dict, finetune_dir: Path) -> int:
    source, out = Path(args.checkpoint), Path(args.out)
    parent = load_checkpoint(source)
    model = model_from_checkpoint(parent, source).eval()
    try:  # before any work: room for the pruned checkpoint (at most the parent's size) and its temporary copy
        check_folder(out.parent, 2 * checkpoint_size({"model": model.state_dict()}), "the pruned checkpoint")
    except WriteError as e:
        raise UsageError(f"cannot write --out {out}: {e.why}; {e.remedy}") from None
    cfg = finetune_config(parent.get("config", {}), given)
    base_macs, base_params = macs_and_params(model)
    record = {"parent": str(source), "parent_sha256": file_sha256(source), "importance": args.importance,
              "flops": args.flops, "steps": args.steps, "round_to": args.round_to,
              "finetune_epochs": args.finetune_epochs,
              "parent_macs": base_macs, "parent_params": base_params, "step_widths": []}
    print(f"{source}: {base_params:,} parameters, {base_macs / 1e6:.1f} M MACs per image, widths "
          f"{','.join(map(str, widths_of(model)))}; keeping {100 * args.flops:g}% of the MACs in {args.steps} "
          f"step(s), {args.importance} importance, {args.finetune_epochs} epoch(s) of fine-tuning")
    kept = None  # the last fine-tune's best checkpoint (the last step always has epochs when any has)
    base_widths = widths_of(model)
    for k in range(1, args.steps + 1):
        widths = target_widths(base_widths, widths_of(model), base_macs * args.flops ** (k / args.steps),
                               cfg.num_classes, cfg.activation, args.round_to)
        prune_to(model, widths, args.importance)
        macs, params = macs_and_params(model)
        record["step_widths"].append(widths)
        print(f"step {k}/{args.steps}: widths {','.join(map(str, widths))}: {params:,} parameters "
              f"({100 * params / base_params:.1f}%), {macs / 1e6:.1f} M MACs ({100 * macs / base_macs:.1f}%)")
        epochs = epochs_of_step(args.finetune_epochs, args.steps, k)
        if not epochs:
            continue
        folder = finetune_dir / f"step-{k}"
        step_cfg = dataclasses.replace(cfg, widths=widths, epochs=epochs, out=str(folder))
        code = train.fit(step_cfg, device=pick_device(cfg.device), overwrite=args.overwrite,
                         initial_weights=clean_state_dict(model.state_dict()))
        if code:
            print(f"the fine-tune of step {k} stopped; python train.py --resume {folder / train.LAST_NAME} "
                  f"continues it; steps {k + 1}..{args.steps} were not run", file=sys.stderr)
            return code
        kept = load_checkpoint(folder / train.BEST_NAME)
        model = model_from_checkpoint(kept, folder / train.BEST_NAME).eval()
    macs, params = macs_and_params(model)
    record.update(macs=macs, params=params, widths=widths_of(model),
                  finetune_dir=str(finetune_dir) if args.finetune_epochs else None)
    if kept is not None:  # the last fine-tune's best checkpoint: its config, epoch, metrics and history
        pruned = {k: v for k, v in kept.items() if k != "run_id"}
    else:  # never fine-tuned: the parent's config and epoch; its metrics and curves are not this network's
        pruned = {"config": {**parent.get("config", {}), "widths": widths_of(model)}, "epoch": parent.get("epoch", 0)}
    save_checkpoint({**pruned, "kind": "pruned", "model": clean_state_dict(model.state_dict()), "pruning": record,
                     "torch_version": str(torch.__version__)}, out)
    load_checkpoint(out)  # read back as evaluate.py will: loads, digest and config checked
    print(f"wrote {out}: {params:,} parameters ({100 * params / base_params:.1f}% of {base_params:,}), "
          f"{macs / 1e6:.1f} M MACs ({100 * macs / base_macs:.1f}% of {base_macs / 1e6:.1f} M; asked "
          f"{100 * args.flops:g}%), widths {','.join(map(str, widths_of(model)))}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Prune a checkpoint's channels to a FLOPs budget and fine-tune it "
                                  "(docs/compression.md). Other flags are train.py's, for the fine-tune.",
                      epilog="exit codes: 0 written; 2 bad input or a missing optional package; "
                             "128+N a fine-tune stopped by signal N")
    p.add_argument("checkpoint", help="a checkpoint written by train.py or prune.py (or a .safetensors export)")
    p.add_argument("--flops", type=kept_fraction, required=True, help="fraction of the checkpoint's MACs to keep")
    p.add_argument("--out", required=True, help="the pruned checkpoint to write")
    p.add_argument("--steps", type=POSITIVE_INT, default=1, help="prune in this many steps (default 1)")
    p.add_argument("--finetune-epochs", type=NONNEG_INT, default=0,
                   help="epochs of fine-tuning in all, split evenly over the steps (default 0: none)")
    p.add_argument("--importance", choices=tuple(IMPORTANCES), default="l1",
                   help="what ranks the channels: l1 (weights' L1 norm), bn (BatchNorm scale), group (group "
                        "L2 norm); default l1")
    p.add_argument("--round-to", type=POSITIVE_INT, default=16,
                   help="every width a multiple of this (default 16: onnxruntime's and oneDNN's fast kernels "
                        "work on blocks of 8 or 16 channels; 1: any width)")
    p.add_argument("--finetune-dir", default=None,
                   help="folder of the fine-tunes, one run per step in step-K/ (default: next to --out, "
                        "named after it with -finetune)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out and the checkpoints of earlier fine-tunes in --finetune-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = get_args_parser().parse_known_args(argv)
    try:
        return run(args, rest)
    except (UsageError, CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (train.NonFiniteLoss, WriteError, FolderInUse) as e:  # a failed write: the file it would replace is kept
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
