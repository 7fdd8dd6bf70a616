"""The config: recipes, the learning-rate schedule, resumed configs, platform defaults, compile fallback."""
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_train_args
from model import resnet9
from training import runtime
from training.checkpoint import load_checkpoint
from training.config import (
    RECIPES,
    TrainConfig,
    UsageError,
    config_problems,
    fresh_config,
    get_args_parser,
    lr_at,
    parse_args,
    resolution_at,
    resumed_config,
)
from training.optim import make_optimizer
from training.run import platform_defaults


def test_recipes():
    paper = fresh_config({})
    assert paper == TrainConfig() and paper.schedule == "constant" and paper.rotation == 10.0
    fast = fresh_config({"recipe": "fast"})
    for key, value in RECIPES["fast"].items():
        assert getattr(fast, key) == value
    assert fast.batch_size == 128 and fast.nesterov and fast.tta_shift == 2 and fast.cutout == 8
    assert not fast.reload_best and fast.val_size == 0 and fast.eval_every >= fast.epochs  # test set: once, at the end
    # progressive resizing: 16 px for the first 40% of the epochs, 32 px for the last 15%, rising between
    sides = [resolution_at(fast, epoch) for epoch in range(1, fast.epochs + 1)]
    assert sides[:8] == [16] * 8 and sides[-3:] == [32] * 3 and sides == sorted(sides)
    assert not fast.tta  # train.py evaluates plain once; evaluate.py --tta gives the 6-view figure
    assert fresh_config({"recipe": "fast", "epochs": 3, "lr": 0.1}).epochs == 3  # flags win over the recipe


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, lr=0.4, schedule="linear", warmup=0.2)
    lrs = [lr_at(cfg, step, 10) for step in range(100)]
    assert lrs[0] == pytest.approx(0.02) and lrs[19] == pytest.approx(0.4) and max(lrs) == pytest.approx(0.4)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:20]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[19:]))
    assert lrs[-1] == pytest.approx(0.4 / 80) and lr_at(cfg, 100, 10) == 0.0
    assert lr_at(TrainConfig(), 1234, 10) == 0.01  # the paper's constant rate
    short = TrainConfig(epochs=2, lr=0.4, schedule="linear", warmup=0.2)  # a warm-up of 0.4 steps
    assert [lr_at(short, step, 1) for step in range(2)] == [0.4, pytest.approx(0.4 / 1.6)]  # never past the peak


def test_resumed_config_keeps_the_recipe():
    saved = dataclasses.asdict(TrainConfig(epochs=5))
    cfg = resumed_config({"epochs": 8, "device": "cpu", "workers": 0, "amp": False}, saved, "last.pth")
    assert cfg.epochs == 8 and cfg.lr == 0.01
    for flags in ({"lr": 0.1}, {"recipe": "fast"}, {"loader": "torchvision"}, {"batch_size": 32}):
        with pytest.raises(UsageError, match="a resumed run keeps its recipe"):
            resumed_config(flags, saved, "last.pth")
    with pytest.raises(UsageError, match="does not know: bogus"):
        resumed_config({}, {**saved, "bogus": 1}, "last.pth")


@pytest.mark.parametrize(("features", "amp"), [({"avx2"}, False), ({"avx2", "avx512f"}, False),
                                               ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True)])
def test_platform_defaults(monkeypatch, features, amp):
    """bf16 by default on CUDA and on a CPU with native bf16 (AMX or AVX512-BF16), fp32 elsewhere."""
    monkeypatch.setattr(runtime, "cpu_features", lambda: features)
    cpu = platform_defaults(TrainConfig(), torch.device("cpu"))
    assert cpu.amp is amp and cpu.channels_last is True
    assert runtime.default_amp(torch.device("cpu"))[1].startswith("bf16" if amp else "fp32")
    cuda = platform_defaults(TrainConfig(), torch.device("cuda"))
    assert cuda.amp is True and cuda.channels_last is True
    forced = platform_defaults(TrainConfig(amp=False, channels_last=False), torch.device("cuda"))
    assert forced.amp is False and forced.channels_last is False


def test_compile_falls_back_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    model = resnet9()
    assert runtime.compile_model(model, torch.device("cpu")) is model
    err = capsys.readouterr().err
    assert err == "warning: --compile: no C++ compiler found; running eager\n"


def test_fast_recipe_runs_end_to_end(tiny_cifar, tmp_path):
    """The fast recipe's pieces together (schedule, Nesterov, label smoothing, no rotation, cutout, 6-view TTA)."""
    args = tiny_train_args(tiny_cifar, tmp_path, "--recipe", "fast", "--batch-size", "64", "--epochs", "2")
    assert train.main(args) == 0
    last = load_checkpoint(tmp_path / train.LAST_NAME)
    assert last["config"]["recipe"] == "fast" and last["config"]["batch_size"] == 64
    history = last["progress"]["history"]
    assert history[0]["lr"] > history[1]["lr"] >= 0  # decaying after the warm-up
    assert not any(h["reloaded"] for h in history)
    assert last["optimizer"]["param_groups"][0]["nesterov"] is True


def test_docs_list_every_flag():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    options = {s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    missing = sorted(o for o in options if f"`{o}`" not in readme and f"`{o} " not in readme)
    assert not missing, f"docs/training.md's flag table lacks {missing}"


def test_optimizer_adamw_trains_resumes_and_refuses_nesterov(tiny_cifar, tmp_path, capsys):
    args = tiny_train_args(tiny_cifar, tmp_path, "--optimizer", "adamw", "--lr", "0.002", "--momentum", "0.8",
                           "--weight-decay", "0.05", "--epochs", "1")
    assert train.main(args) == 0
    last = load_checkpoint(tmp_path / train.LAST_NAME)
    group = last["optimizer"]["param_groups"][0]
    assert last["config"]["optimizer"] == "adamw"
    assert tuple(group["betas"]) == (0.8, 0.999)
    assert group["weight_decay"] == 0.05 and "exp_avg_sq" in next(iter(last["optimizer"]["state"].values()))
    capsys.readouterr()
    resume = ["--resume", str(tmp_path / train.LAST_NAME), "--epochs", "2", "--device", "cpu", "--workers", "0"]
    assert train.main([*resume, "--optimizer", "sgd"]) == 2
    assert "a resumed run keeps its recipe" in capsys.readouterr().err
    assert train.main(resume) == 0  # goes on with AdamW and its moments
    assert load_checkpoint(tmp_path / train.LAST_NAME)["epoch"] == 2
    assert train.main(tiny_train_args(tiny_cifar, tmp_path / "fast", "--recipe", "fast", "--optimizer", "adamw")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-nesterov" in err


def test_paper_optimizer_is_sgd():
    model = resnet9()
    optimizer = make_optimizer(TrainConfig(), model, torch.device("cpu"))
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.9, False, 0.0)


def test_widths_flag_is_a_list_checked_on_the_command_line_and_in_a_saved_config(capsys):
    given, _ = parse_args(["--widths", "8,16,24,32,40,48,56,64"])
    assert given["widths"] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert fresh_config({}).widths == [] and fresh_config(given).widths == given["widths"]
    for bad in ("8,16", "8,x,24,32,40,48,56,64", "0,16,24,32,40,48,56,64"):
        with pytest.raises(SystemExit) as stop:
            parse_args(["--widths", bad])
        assert stop.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
    saved = dataclasses.asdict(TrainConfig(widths=[8, 16, 24, 32, 40, 48, 56, 64]))
    assert config_problems(saved) == []
    assert config_problems({**saved, "widths": [8, 16]}) == ["widths=[8, 16]"]
    assert config_problems({**saved, "widths": (8, 16, 24, 32, 40, 48, 56, 64)}) != []  # a tuple: not what we write
    with pytest.raises(UsageError, match="a resumed run keeps its recipe"):
        resumed_config({"widths": [9] * 8}, saved, "last.pth")
    assert resumed_config({"widths": saved["widths"]}, saved, "last.pth").widths == saved["widths"]
