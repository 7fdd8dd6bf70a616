"""Levers of the fast recipe: progressive resizing (--min-res, --res-ramp: the schedule of
resolutions, the batches the loaders hand out, a run that trains through it and evaluates at 32
pixels), alternating flips (--flip alternate) and BatchNorm's own parameter groups."""
import itertools

import numpy as np
import pytest
import torch

import train
from conftest import synthetic_images, tiny_train_args
from data import TorchvisionLoader, resize_batch
from training import optim
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, get_args_parser, resolution_at
from training.device_loader import DeviceLoader, alternating_flips
from training.run import cuda_graph_problem

CPU = torch.device("cpu")


def test_resolution_rises_from_min_res_to_32_over_the_ramp():
    cfg = TrainConfig(epochs=20, min_res=16, res_ramp="0.25,0.75")
    sides = [resolution_at(cfg, e) for e in range(1, 21)]
    assert sides[:6] == [16] * 6  # epochs 1-5 start before 25% of the run, and epoch 6 at it
    assert sides[15:] == [32] * 5  # from 75% of the run on
    assert all(a <= b for a, b in itertools.pairwise(sides)) and all(s % 4 == 0 for s in sides)
    assert len(set(sides[5:16])) >= 4  # a ramp, not a jump
    assert [resolution_at(TrainConfig(epochs=4), e) for e in range(1, 5)] == [32] * 4  # off by default
    jump = TrainConfig(epochs=10, min_res=24, res_ramp="0.5,0.5")
    assert [resolution_at(jump, e) for e in range(1, 11)] == [24] * 5 + [32] * 5


@pytest.mark.parametrize("flags", [["--min-res", "30"], ["--min-res", "4"], ["--res-ramp", "0.8,0.2"],
                                   ["--res-ramp", "half"], ["--res-ramp", "0.1,1.5"]])
def test_bad_resizing_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(flags)
    assert "is not" in capsys.readouterr().err


def test_resize_batch_averages_and_keeps_32_untouched():
    x = torch.arange(4.0).repeat_interleave(16).view(1, 1, 1, 64).expand(1, 3, 64, 64).contiguous()
    assert resize_batch(x, 64) is x
    small = resize_batch(x, 4)
    assert small.shape == (1, 3, 4, 4)
    torch.testing.assert_close(small[0, 0, 0], torch.arange(4.0))  # each output pixel: the mean of its 16 columns


@pytest.mark.parametrize("kind", ["device", "torchvision"])
def test_loaders_hand_out_batches_at_their_resolution(kind):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 24)
    images = synthetic_images(labels, rng)
    make = (lambda: DeviceLoader(images, labels, 8, seed=0, device=CPU)) if kind == "device" else \
        (lambda: TorchvisionLoader(images, labels, 8, seed=0, workers=0, device=CPU))
    full, small = make(), make()
    small.resolution = 16
    for loader in (full, small):
        loader.set_epoch(1)
    for (a, ya), (b, yb) in zip(full, small, strict=True):
        assert a.shape[-2:] == (32, 32) and b.shape[-2:] == (16, 16) and torch.equal(ya, yb)
        torch.testing.assert_close(b, resize_batch(a, 16))  # the same augmented images, scaled down


@pytest.mark.slow
def test_a_run_with_progressive_resizing_trains_small_then_evaluates_at_32(tiny_cifar, tmp_path, capsys):
    args = tiny_train_args(tiny_cifar, tmp_path, "--epochs", "4", "--min-res", "16", "--res-ramp", "0.5,0.5")
    assert train.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    history = load_checkpoint(tmp_path / train.LAST_NAME)["progress"]["history"]
    assert [h["resolution"] for h in history] == [16, 16, 32, 32]
    assert "16 px" in lines[0] and "32 px" in lines[3]
    assert all(h["val_acc"] is not None for h in history)  # evaluated on 32-pixel images every epoch
    problem = cuda_graph_problem(TrainConfig(min_res=16), torch.device("cuda"))
    assert problem is not None and "--min-res" in problem


def test_alternating_flips_show_each_image_both_ways_in_any_two_epochs_running():
    labels = np.arange(64) % 10
    flips = [alternating_flips(64, 3, e) for e in range(1, 5)]
    assert 16 < int(flips[0].sum()) < 48  # the first epoch: a coin per image
    for a, b in itertools.pairwise(flips):
        assert torch.equal(a, ~b)
    assert torch.equal(flips[0], alternating_flips(64, 3, 1)) and not torch.equal(flips[0], alternating_flips(64, 4, 1))
    # Bright left halves: after a crop of at most 4 pixels, an image shows its bright half on the
    # right exactly when it was flipped.
    halves = np.zeros((64, 32, 32, 3), np.uint8)
    halves[:, :, :16] = 255
    common = {"seed": 3, "device": CPU, "rotation": 0.0}
    loader = DeviceLoader(halves, labels, 64, flip="alternate", **common)
    for epoch in (1, 2, 3):
        loader.set_epoch(epoch)
        order = torch.tensor(loader.sampler.indices())
        x, _ = next(iter(loader))
        flipped = torch.empty(64, dtype=torch.bool)
        flipped[order] = x[..., 16:].sum((1, 2, 3)) > x[..., :16].sum((1, 2, 3))
        assert torch.equal(flipped, alternating_flips(64, 3, epoch))
    with pytest.raises(ValueError, match="unknown flip"):
        DeviceLoader(halves, labels, 8, flip="never", **common)


def test_alternate_flips_with_the_torchvision_loader_is_one_line(tiny_cifar, tmp_path, capsys):
    args = tiny_train_args(tiny_cifar, tmp_path, "--flip", "alternate", "--loader", "torchvision")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--flip alternate" in err and "device loader" in err


def test_batchnorm_groups_scale_the_bias_rate_and_freeze_the_weights(tiny_cifar, tmp_path):
    args = tiny_train_args(tiny_cifar, tmp_path, "--schedule", "linear", "--lr", "0.05", "--weight-decay", "5e-4",
                           "--bn-bias-lr-scale", "8", "--bn-freeze-weight")
    assert train.main(args) == 0
    last = load_checkpoint(tmp_path / train.LAST_NAME)
    weights = last["model"]
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in weights.items()
               if k.endswith("weight") and ("bn" in k or "shortcut.1" in k))  # the scales never moved
    assert not torch.equal(weights["bn1.bias"], torch.zeros_like(weights["bn1.bias"]))  # the biases trained
    groups = last["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 8.0, 0.0]
    assert groups[1]["lr"] == pytest.approx(8 * groups[0]["lr"]) and groups[0]["lr"] > 0 and groups[2]["lr"] == 0
    assert groups[1]["weight_decay"] == pytest.approx(5e-4 / 8) and groups[0]["weight_decay"] == 5e-4
    n_bn = sum(1 for k in weights if k.endswith("running_mean"))
    assert len(groups[1]["params"]) == len(groups[2]["params"]) == n_bn
    assert len(groups[0]["params"]) + 2 * n_bn == len([k for k in weights if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))])
    plain = optim.param_groups(TrainConfig(), torch.nn.Linear(2, 2))
    assert len(plain) == 1  # without the flags: one group, as before
