"""The training step and where a CUDA graph is used: what can be checked without a GPU.

The graph itself is exercised by tests/test_cuda.py (python -m pytest -m cuda)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import synthetic_images
from model import resnet9
from training.config import TrainConfig, UsageError, fresh_config, resumed_config
from training.device_loader import DeviceLoader
from training.run import platform_defaults
from training.step import CudaGraphStep, EagerStep, make_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_eager_step_trains_and_returns_detached_outputs():
    torch.manual_seed(0)
    model = resnet9()
    model.train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = make_step(model, optimizer, F.cross_entropy, device=CPU, amp=False, channels_last=True,
                     cuda_graph=False, batch_size=16)
    assert type(step) is EagerStep
    losses = [step(x, y)[0].item() for _ in range(4)]
    loss, logits = step(x, y)
    assert not loss.requires_grad and not logits.requires_grad and logits.shape == (16, 10)
    assert losses[-1] < losses[0]


def test_a_cuda_graph_step_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaGraphStep(resnet9(), torch.optim.SGD(resnet9().parameters(), lr=0.1), F.cross_entropy, device=CPU,
                      amp=False, channels_last=False, batch_size=64)


@pytest.mark.parametrize(("flags", "device", "distributed", "graph"), [
    ({}, CPU, False, False),
    ({}, CUDA, False, True),  # the paper's recipe on a GPU
    ({"recipe": "fast"}, CUDA, False, False),  # linear schedule: the lr changes every step
    ({"compile": True}, CUDA, False, True),  # the compiled kernels are recorded
    ({}, CUDA, True, False),  # under torchrun
    ({"ema": 0.99}, CUDA, False, False),  # the weight average trains eagerly
])
def test_the_graph_is_the_default_where_it_can_work(flags, device, distributed, graph):
    cfg = platform_defaults(fresh_config(flags), device, distributed)
    assert cfg.cuda_graph is graph


@pytest.mark.parametrize(("flags", "message"), [
    ({"cuda_graph": True}, "needs a CUDA device"),
    ({"cuda_graph": True, "recipe": "fast"}, "needs --schedule constant"),
    ({"cuda_graph": True, "ema": 0.99}, "weight average"),
])
def test_asking_for_a_graph_where_it_cannot_work_is_a_usage_error(flags, message):
    device = CPU if len(flags) == 1 else CUDA
    with pytest.raises(UsageError, match=message):
        platform_defaults(fresh_config(flags), device)


def test_cuda_graph_flag_on_the_cpu_is_one_line(tiny_cifar, tmp_path, capsys):
    code = train.main(["--data-dir", str(tiny_cifar), "--out", str(tmp_path), "--device", "cpu", "--cuda-graph"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--cuda-graph: it needs a CUDA device" in err
    assert not any(tmp_path.iterdir())


def test_a_resumed_run_decides_the_graph_again_for_its_machine():
    saved = {**vars(TrainConfig()), "cuda_graph": True, "amp": True}
    resumed = resumed_config({"device": "cpu"}, saved, "last.pth")
    assert resumed.cuda_graph is None and resumed.amp is True  # bf16 stays as the run began
    assert resumed_config({"cuda_graph": False}, saved, "last.pth").cuda_graph is False


@pytest.mark.parametrize("batch", [64, 100])
def test_augmenting_an_epoch_in_chunks_gives_the_same_batches(batch):
    """The GPU's way (the epoch augmented in launches of several batches) and the CPU's (batch by
    batch) give the same batches, including the partial last one, for a batch that does not divide
    the chunk."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 650)
    images = synthetic_images(labels, rng)
    epochs = []
    for chunk in (None, 256):
        loader = DeviceLoader(images, labels, batch, seed=5, device=CPU, epoch_chunk=chunk)
        loader.set_epoch(3, start_step=1)
        epochs.append(list(loader))
    assert [len(y) for _, y in epochs[0]] == [len(y) for _, y in epochs[1]]
    assert sum(len(y) for _, y in epochs[0]) == 650 - batch
    for (xa, ya), (xb, yb) in zip(*epochs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
