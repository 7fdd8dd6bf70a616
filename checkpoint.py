"""Checkpoints: written atomically, loaded safely, checked before use.

A checkpoint is a plain dict of tensors and primitives (model and optimizer state, epoch, scores,
history, the run's config as a dict, RNG states). It is written to a temporary file in the same
folder and moved into place with `os.replace`, so a crash never leaves a half-written file under
the real name. It is read with `torch.load(weights_only=True)`, which builds tensors and
primitives only: a pickle that tries to import or call anything is refused, not run.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from config import config_problems
from model import build_model

_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, unsafe or of another model; the message says which."""


def clean_state_dict(state: dict) -> dict:
    """Strip the wrappers' key prefixes, so a checkpoint loads into a bare model anywhere."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write `obj` to `path` atomically: a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: same disk
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_layout(obj, path: Path) -> None:
    """The parts every reader relies on: a model state dict, a config dict of values the flags would
    accept (the model's own are model_from_checkpoint's to check), an integer epoch."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' state dict)")
    if not isinstance(obj.get("config", {}), dict):
        raise CheckpointError(f"{path}: its 'config' is not a dict")
    bad = config_problems(obj.get("config", {}), skip=("arch", "num_classes"))  # model_from_checkpoint's
    if bad:
        raise CheckpointError(f"{path}: its config holds values no flag accepts ({', '.join(bad)}); "
                              "the file is damaged")
    if type(obj.get("epoch", 0)) is not int:
        raise CheckpointError(f"{path}: its 'epoch' is not an integer (the file is damaged)")


def _describe_load_error(e: Exception) -> str:
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused: it names {found.group(1)}, which is neither a tensor nor plain data "
                "(a pickle that could run code is never loaded)")
    found = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    detail = found.group(1).strip() if found else " ".join(text.split()) or type(e).__name__
    return f"not a readable checkpoint (truncated, corrupt or not a PyTorch file: {detail[:160]})"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely, or raise CheckpointError with one line saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on corrupt input; all mean "unusable"
        raise CheckpointError(f"{path}: {_describe_load_error(e)}") from None
    _check_layout(obj, path)
    return obj


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuild the model named in the checkpoint's config and load its weights (strictly)."""
    config = ckpt.get("config", {})
    arch, num_classes = config.get("arch", "resnet9"), config.get("num_classes", 10)
    if not isinstance(arch, str) or not isinstance(num_classes, int) or not 0 < num_classes <= 100_000:
        raise CheckpointError(f"{path}: its config names no usable model (arch={arch!r}, num_classes={num_classes!r})")
    try:
        model = build_model(arch, num_classes)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = clean_state_dict(ckpt["model"])
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: its model state holds something other than named tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: holds a different architecture than {arch} ({detail[:300]})") from None
    return model
