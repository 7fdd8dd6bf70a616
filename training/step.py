"""One training step (forward, loss, backward, optimizer step): eager, or captured once as a CUDA graph.

At the paper's batch of 64 a GPU is bound by kernel launches, not arithmetic: ResNet9's forward,
backward and SGD step are a few hundred small kernels, each launched from Python, and the GPU
waits for them. `CudaGraphStep` records the whole step once as a CUDA graph and then replays it
with one launch per step (PyTorch, "CUDA Graphs": whole-network capture). What capture requires,
and how it is met here:

- static shapes and addresses: batches are copied into fixed input tensors; a batch of another
  size (the last, partial batch of an epoch) runs eagerly on the same parameters and optimizer;
- no host syncs inside the step: the loss and the logits stay on the device;
- optimizer state that exists before capture: the first steps run eagerly (on a side stream, as
  capture asks) and they are real steps of the run, so momentum buffers and cuDNN's algorithm
  choices exist when the step is recorded, and nothing is trained twice or skipped;
- a learning rate that does not change: it is recorded into the graph, so the graph is used with
  the constant schedule only (train.py decides); weights loaded later with `load_state_dict`
  (the best-weights reload) are copied into the same tensors and the graph sees them.
If capture fails, the step says so in one line and the run goes on eagerly.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from training.runtime import autocast


class EagerStep:
    """forward, loss, backward and optimizer step on one batch; returns the detached loss and logits.
    The loss is `loss_fn(logits, y)`, or `loss_fn(logits, y, x)` with the batch as the model saw it
    when the loss says it `takes_inputs` (distill.DistillationLoss: the teachers see the batch too)."""

    graphed = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 device: torch.device, amp: bool, channels_last: bool) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.takes_inputs = getattr(loss_fn, "takes_inputs", False)
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def _compute(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp):
            logits = self.model(x)
            loss = self.loss_fn(logits, y, x) if self.takes_inputs else self.loss_fn(logits, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        return self._compute(x, y)


class CudaGraphStep(EagerStep):
    """The step of `batch_size` images recorded as one CUDA graph after `warmup` eager steps."""

    graphed = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 device: torch.device, amp: bool, channels_last: bool, batch_size: int, warmup: int = 3) -> None:
        super().__init__(model, optimizer, loss_fn, device=device, amp=amp, channels_last=channels_last)
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, not {device}")
        self.batch_size, self.warmup_left = batch_size, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why capture failed; the step is eager from then on
        self.replays = 0
        self.eager_steps = 0
        self._side = torch.cuda.Stream(device)
        self._x = self._y = self._loss = self._logits = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) != self.batch_size or self.failed:
            self.eager_steps += 1
            return super().__call__(x, y)
        if self.graph is None:
            if self.warmup_left > 0:
                return self._warmup_step(x, y)
            self._capture(x, y)
            if self.graph is None:  # capture failed: this batch's step was not taken yet
                self.eager_steps += 1
                return super().__call__(x, y)
        else:
            self._x.copy_(x, non_blocking=True)
            self._y.copy_(y, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self._loss, self._logits

    def _warmup_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A real step, on a side stream: capture wants its allocations and lazy set-up made there."""
        self.warmup_left -= 1
        self.eager_steps += 1
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = super().__call__(x, y)
        current.wait_stream(self._side)
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record the step on this batch; the caller replays the graph to take it."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self._x = torch.empty_like(x, device=self.device, memory_format=memory_format)
        self._y = torch.empty_like(y, device=self.device)
        self._x.copy_(x)
        self._y.copy_(y)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's memory
        try:
            with torch.cuda.graph(graph):
                self._loss, self._logits = self._compute(self._x, self._y)
        except RuntimeError as e:
            self.failed = " ".join(str(e).split())[:200]
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            print(f"warning: CUDA graph capture failed ({self.failed}); training eagerly", file=sys.stderr)
            return
        self.graph = graph


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *, device: torch.device,
              amp: bool, channels_last: bool, cuda_graph: bool, batch_size: int) -> EagerStep:
    """The step a run uses: a CUDA graph when asked for (and on CUDA), else eager."""
    kwargs = {"device": device, "amp": amp, "channels_last": channels_last}
    if cuda_graph:
        return CudaGraphStep(model, optimizer, loss_fn, batch_size=batch_size, **kwargs)
    return EagerStep(model, optimizer, loss_fn, **kwargs)
