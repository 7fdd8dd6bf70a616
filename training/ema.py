"""An exponential moving average (EMA) of a model's weights, for `train.py --ema DECAY`.

The average is a copy of the model whose parameters follow the trained ones,

    average = d * average + (1 - d) * weights,   d = min(DECAY, (1 + n) / (10 + n)),

every `--ema-every` optimizer steps, n being the updates made so far. The warm-up of d keeps the
first averages from being dominated by the random initial weights. train.py evaluates and saves
the copy in place of the trained model, and keeps it (with n) in last.pth for an exact resume.

BatchNorm's running statistics belong to the weights they were measured with, and the averaged
weights are not those. With `--ema-bn recompute` (the default) they are measured anew for the
average before it is evaluated or saved: `torch.optim.swa_utils.update_bn` runs the average over
`--ema-bn-images` training images (their epoch's augmentation, the same images whether or not the
run was stopped and resumed). `--ema-bn copy` keeps the trained model's statistics, as earlier
versions did (measured to cost the fast recipe 2-3 points: docs/fast-recipe.md).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from training.checkpoint import clean_state_dict, unwrap
from training.runtime import autocast


class WeightAverage:
    """`model`, an exponential moving average of the weights of the model it was made from."""

    def __init__(self, model: nn.Module, decay: float, every: int) -> None:
        source = unwrap(model)
        self.model = copy.deepcopy(source).requires_grad_(False).eval()  # starts at the initial weights
        self.decay, self.every, self.updates = decay, every, 0
        # The tensors pair up once, in a deep copy's order. The model's are updated in place by the
        # optimizer (and, in a CUDA graph, by its replays), so these references stay the live weights
        # for the whole run. They are float32 (bf16 is autocast only), so the average is float32 too.
        self._live_weights, self._avg_weights = list(source.parameters()), list(self.model.parameters())
        self._live_buffers, self._avg_buffers = list(source.buffers()), list(self.model.buffers())

    def after_step(self, run_step: int) -> None:
        """Called after each optimizer step with the steps the run has taken (counted over the whole
        run, so a resumed run updates at the same steps); updates every `every` steps."""
        if run_step % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """One update, in two fused calls and without a host sync (d is a Python number)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg_weights, self._live_weights, 1 - decay)
        # BatchNorm's running statistics are copied, not averaged (a common choice for weight EMAs):
        # they are a moving average over batches already, so averaging them again would only add lag.
        # Exact would be to measure them anew for the averaged weights (swa_utils.update_bn): a pass
        # over the training images per evaluation.
        torch._foreach_copy_(self._avg_buffers, self._live_buffers)
        self.updates += 1

    def recompute_bn(self, batches: Iterable, images: int, *, device: torch.device, amp: bool,
                     channels_last: bool) -> None:
        """Measure the average's BatchNorm statistics on the first `images` images of `batches`
        ((x, y) pairs), as the trained model would see them (autocast, memory format); a cumulative
        mean over those batches (update_bn sets momentum None), so the result does not depend on
        BatchNorm's momentum. The next update copies the trained model's statistics back: the
        recomputed ones serve evaluation and the saved best checkpoint only."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

        def first_images():
            seen = 0
            for x, _ in batches:
                if seen >= images:
                    return
                x = x[:images - seen]
                seen += len(x)
                yield x.to(device).contiguous(memory_format=memory_format)
        with autocast(device, amp):
            update_bn(first_images(), self.model)
        self.model.eval()

    def state_dict(self) -> dict:
        """What last.pth keeps: the averaged state (no wrapper prefixes) and the updates made."""
        return {"model": clean_state_dict(self.model.state_dict()), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; raises TypeError, KeyError or RuntimeError if it is malformed."""
        if type(state["updates"]) is not int or state["updates"] < 0:
            raise TypeError("its weight average's update count is not a count")
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
