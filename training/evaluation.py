"""The model's loss and accuracy on a loader, with test-time augmentation: what each epoch's
selection in train.py and the report of evaluate.py compute, on the batches of `make_eval_loader`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from data import ImageDataset, eval_transform, init_worker, normalize_batch, to_device_images
from training.runtime import autocast


def make_eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, *, workers: int,
                     device: torch.device, rank: int = 0, world_size: int = 1, on_device: bool = False):
    """Unshuffled, unaugmented batches of this rank's share (every world_size-th image) of a split:
    normalised on the device from uint8 held there (`on_device`), or by DataLoader workers."""
    shard = slice(rank, None, world_size)
    if on_device:
        return DeviceBatches(images[shard], labels[shard], batch_size, device)
    return DataLoader(ImageDataset(images[shard], labels[shard], eval_transform()), batch_size=batch_size,
                      shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=init_worker)


class DeviceBatches:
    """Unaugmented batches of uint8 images held on the device, normalised one batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device) -> None:
        self.images, self.labels = to_device_images(images, device), torch.from_numpy(labels).to(device)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield normalize_batch(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Normalised images moved by (dy, dx) pixels, the uncovered border black: the colour the
    training crop's zero padding has after normalisation."""
    h, w = x.shape[-2:]
    black = normalize_batch(torch.zeros(1, x.shape[1], 1, 1, dtype=torch.uint8, device=x.device)).to(x.dtype)
    out = torch.empty_like(x)  # the same memory format as x
    out[:] = black
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def forward(model: nn.Module, x: torch.Tensor, *, tta: bool = False, shift: int = 0) -> torch.Tensor:
    """Logits (float32); with `tta`, the mean of the logits of the images and their mirror images,
    and with `shift` also of both moved by `shift` pixels down-right and up-left (6 views)."""
    if not tta:
        return model(x).float()
    views = [x] + [shifted(x, d, d) for d in ((shift, -shift) if shift else ())]
    return torch.stack([model(v).float() + model(v.flip(3)).float() for v in views]).sum(0) / (2 * len(views))


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, channels_last: bool = False,
             tta: bool = False, shift: int = 0, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Mean cross-entropy and top-1 accuracy (%) over a loader; `reduce` sums the totals across ranks."""
    model.eval()
    sums = torch.zeros(3, device=device)  # loss sum, correct, images; kept on the device: no per-batch sync
    for x, y in loader:
        x, y = _prepare(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = forward(model, x, tta=tta, shift=shift)
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    loss_sum, correct, n = reduce(sums).tolist()
    return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1), "n": int(n)}


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device, *, amp: bool = False, channels_last: bool = False,
            tta: bool = False, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for every image, one batch in memory at a time."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in loader:
        with autocast(device, amp):
            logits = forward(model, _prepare(x, device, channels_last), tta=tta, shift=shift)
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)
