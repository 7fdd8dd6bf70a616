"""Where and how a run executes: device choice, mixed precision, seeding, RNG state, stop signals.

Shared by train.py and evaluate.py. Nothing here runs at import time.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
from torch import nn

DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")


def available_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """DataLoader workers for this machine: enough to feed a GPU; on CPU one, so the model keeps the cores."""
    cpus = available_cpus()
    return min(8, cpus) if device.type == "cuda" else min(1, cpus - 1)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; a named device must exist or this raises ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_TYPES)} (or cuda:N)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {name!r}; use one of {', '.join(DEVICE_TYPES)} (or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA or the CPU when enabled; a no-op everywhere else."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_features() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what it has: AMX or AVX512-BF16 (native), else
    the vector extension torch dispatches to (AVX2, AVX512...), where bf16 is emulated and slower
    than fp32 (measured 15x slower on an AVX2-only EPYC)."""
    flags = cpu_features()
    if "amx_bf16" in flags:
        return True, "AMX"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    return False, torch.backends.cpu.get_cpu_capability()


def default_amp(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast is on by default on this device, and why (for the run's first line)."""
    if device.type == "cuda":
        return True, "bf16 autocast on CUDA"
    if device.type == "cpu":
        native, what = cpu_bf16()
        if native:
            return True, f"bf16 autocast: this CPU has {what}"
        return False, f"fp32: this CPU has {what} but no native bf16 (AMX or AVX512-BF16)"
    return False, f"fp32 on {device.type}"


def use_deterministic_algorithms(device: torch.device) -> None:
    """From here on, only deterministic kernels (an op that has none raises RuntimeError); on CUDA
    also a fixed cuBLAS workspace and no cuDNN autotuning. Called at the start of a run, not at import."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as plain tensors and lists, so a checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Distributed:
    """This process's place in a torchrun job; a process not started by torchrun is rank 0 of 1."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, launched: bool | None = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.launched = world_size > 1 if launched is None else launched

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use: under torchrun, even with one process (DDP, NCCL or gloo)."""
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks in place (a no-op for a single process)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm running statistics, so all evaluate the same model."""
        if self.enabled:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)

    def first_error(self, error: Exception | str | None) -> Exception | str | None:
        """Rank 0's error (an exception or a message, or None) on every rank, so that all stop together."""
        if not self.enabled:
            return error
        box = [error]
        torch.distributed.broadcast_object_list(box, 0)
        return box[0]


def init_distributed(device_name: str, timeout_s: float) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    NCCL on CUDA (one GPU per process, by LOCAL_RANK), gloo on the CPU. A collective that waits
    longer than `timeout_s` (a process died or hangs) raises instead of hanging the job."""
    if "WORLD_SIZE" not in os.environ:  # not started by torchrun
        return Distributed(), pick_device(device_name)
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {rank} has LOCAL_RANK {local_rank} but this node has only "
                             f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"torchrun runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                         **({"device_id": device} if device.type == "cuda" else {}))
    return Distributed(rank, world_size, local_rank, launched=True), device


def close_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum shared by all is the sum of their gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all processes.

    `nn.SyncBatchNorm` runs on GPUs only; this is its CPU (gloo) counterpart, so that `--sync-bn`
    works, and is tested, on the CPU. The statistics are summed with a differentiable all-reduce,
    so gradients flow through the shared mean and variance as they do in nn.SyncBatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = (0, 2, 3)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        total = all_reduce(local)
        n = total[-1]
        mean = total[:-1] / n
        centered = x - mean.view(1, -1, 1, 1)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)  # unbiased, as BatchNorm2d keeps it
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.affine else y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm (CUDA) or CPUSyncBatchNorm (CPU); state-dict keys are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            convert_sync_batchnorm(child, device)
    return model


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile where it can work; otherwise a one-line warning and the eager model."""
    problem = None
    if not torch._dynamo.is_dynamo_supported():
        problem = "torch.compile is not supported on this Python/platform"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        problem = "triton is not installed"
    elif device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        problem = "no C++ compiler found"
    elif device.type == "mps":
        problem = "not used on MPS"
    if problem:
        print(f"warning: --compile: {problem}; running eager", file=sys.stderr)
        return model
    return torch.compile(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel without the buffer broadcast at every forward: BatchNorm statistics
    are shared once per epoch instead (Distributed.broadcast_buffers, before evaluation)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    # torch 2.13 renamed the switch (broadcast_buffers is deprecated there); older releases know only the old name.
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               **no_sync)
