"""Checkpoints: written atomically, loaded safely, checked before use.

A checkpoint is a plain dict of tensors and primitives (model and optimizer state, epoch, scores,
history, the run's config as a dict, RNG states). It is written to a temporary file in the same
folder and moved into place with `os.replace`, so a crash never leaves a half-written file under
the real name, and a failed write (a full disk: writes.py) leaves the previous file as it was. It
is read with `torch.load(weights_only=True)`, which builds tensors and primitives only: a pickle
that tries to import or call anything is refused, not run.

Every checkpoint records a SHA-256 of its tensors (`tensor_sha256`: names, dtypes, shapes and bytes),
checked on load: the zip format has no checksum of its own, so a flipped bit in the weights would
otherwise load silently. A checkpoint written before the digest existed still loads, with a note.
A `.safetensors` file written by export.py loads here too (`load_checkpoint` reads either).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from files.writes import replaced
from model import build_model
from training.config import config_problems

_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile
DIGEST_KEY = "tensor_sha256"  # where a checkpoint (or a .safetensors file's metadata) keeps its digest
OPTIONAL = "pip install -r requirements-optional.txt"
_noted_unchecked: set[str] = set()  # files already noted as carrying no digest (one note per file)


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


def _tensors(obj, path: str = ""):
    """(path, tensor) for every tensor inside nested dicts (in the order of their keys' repr: a
    .safetensors file does not keep the order), lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in sorted(obj.items(), key=lambda kv: repr(kv[0])):
            yield from _tensors(value, f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}")


def tensor_digest(obj: dict) -> str:
    """SHA-256 over every tensor in `obj` (but a top-level digest): its path, dtype, shape and bytes in
    logical (contiguous) order, so the memory layout a tensor was saved in does not change it."""
    h = hashlib.sha256()
    rest = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    for path, t in _tensors(rest):
        h.update(f"{path}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def check_digest(obj: dict, path: Path) -> None:
    """Raise CheckpointError if the recorded digest does not match the tensors; note (once per file,
    on stderr) a checkpoint that records none."""
    recorded = obj.get(DIGEST_KEY)
    if recorded is None:
        if str(path) not in _noted_unchecked:
            _noted_unchecked.add(str(path))
            print(f"note: {path} records no SHA-256 of its tensors (written before checkpoints carried one); "
                  "loaded without that check", file=sys.stderr)
        return
    if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise CheckpointError(f"{path}: its recorded SHA-256 is not a digest; the file is damaged")
    try:
        actual = tensor_digest(obj)
    except (RuntimeError, TypeError, ValueError) as e:  # a tensor kind no checkpoint of ours holds
        raise CheckpointError(f"{path}: cannot check its SHA-256 ({' '.join(str(e).split())[:160]})") from None
    if actual != recorded:
        raise CheckpointError(f"{path}: its tensors do not match the SHA-256 recorded when it was saved "
                              "(bits changed on disk or in transfer); the file is damaged, use another copy")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what names a teacher or a pruned checkpoint's parent)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    return h.hexdigest()


def checkpoint_size(obj: dict) -> int:
    """About the bytes `obj` takes saved: its tensors' bytes, and 64 KiB for the zip and the pickle."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(obj)) + 64 * 1024


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write `obj` and the SHA-256 of its tensors to `path` atomically: a temp file in the same folder,
    fsync, then os.replace. A failed write (full disk, read-only folder...) removes the temp file and
    raises WriteError; the file under `path` is then the one that was there before."""
    path = Path(path)
    obj = {**obj, DIGEST_KEY: tensor_digest(obj)}
    with replaced(path, "the checkpoint", needed=checkpoint_size(obj), sync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


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


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def load_safetensors(path: Path) -> dict:
    """A .safetensors file written by export.py, as a checkpoint dict: its weights under 'model',
    its config, class names and epoch from the metadata; the digest in the metadata checked."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading a .safetensors file needs the safetensors package: "
                              f"{OPTIONAL}") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        obj = {"kind": "safetensors", "model": state, "config": json.loads(meta.get("config", "{}")),
               "classes": json.loads(meta.get("classes", "null")), "epoch": int(meta.get("epoch", 0))}
    except (SafetensorError, OSError, ValueError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt: "
                              f"{detail[:160]})") from None
    obj[DIGEST_KEY] = meta.get(DIGEST_KEY)  # checked by load_checkpoint, as a .pth's
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint (or a .safetensors export) safely, its digest checked, or raise
    CheckpointError with one line saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        safetensors = is_safetensors(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    obj = load_safetensors(path) if safetensors else _load_pickled(path)
    _check_layout(obj, path)
    check_digest(obj, path)
    return obj


def _load_pickled(path: Path):
    """torch.load with weights_only=True: tensors and plain data, nothing that could run code."""
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on corrupt input; all mean "unusable"
        raise CheckpointError(f"{path}: {_describe_load_error(e)}") from None
    return obj


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuild the model named in the checkpoint's config (of its channel widths: a pruned one is
    as small as it was pruned to) and load its weights (strictly)."""
    config = ckpt.get("config", {})
    arch, num_classes = config.get("arch", "resnet9"), config.get("num_classes", 10)
    activation = config.get("activation", "relu")  # checkpoints written before --activation used ReLU
    widths = config.get("widths", [])  # the standard ResNet9's unless pruned (prune.py); checked by _check_layout
    if not isinstance(arch, str) or not isinstance(num_classes, int) or not 0 < num_classes <= 100_000:
        raise CheckpointError(f"{path}: its config names no usable model (arch={arch!r}, num_classes={num_classes!r})")
    try:
        model = build_model(arch, num_classes, activation, widths)
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
