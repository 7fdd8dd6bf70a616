"""--ema: the weight average's arithmetic, what a run evaluates and saves with it, exact resume."""
import signal

import pytest
import torch
from torch import nn

import train
from conftest import assert_same_run, final_state, stop_at_training_step, tiny_train_args
from training.checkpoint import load_checkpoint, save_checkpoint
from training.ema import WeightAverage


def test_the_average_follows_the_warmed_up_decay_and_copies_the_buffers():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    average = WeightAverage(model, decay=0.2, every=2)
    for run_step, value in enumerate([9.0, 1.0, 9.0, 2.0, 9.0, 4.0], start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(run_step)
        average.after_step(run_step)  # updates at steps 2, 4 and 6 only: the 9s are never seen
    # decays min(0.2, (1 + n) / (10 + n)) for n = 0, 1, 2: 0.1, 2/11, then 0.2
    first = 0.1 * 0.0 + 0.9 * 1.0  # 0.9
    second = 2 / 11 * first + 9 / 11 * 2.0  # 1.8
    third = 0.2 * second + 0.8 * 4.0  # 3.56
    assert average.updates == 3
    for p in average.model.parameters():
        assert p.dtype == torch.float32 and torch.allclose(p, torch.full_like(p, third), rtol=1e-6)
    assert average.model[1].running_mean.item() == 4.0  # BatchNorm statistics are copied, not averaged
    assert average.model[1].num_batches_tracked.item() == 6


def test_recomputed_batchnorm_statistics_are_the_means_over_the_first_images():
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))  # BatchNorm sees the images themselves
    average = WeightAverage(model, decay=0.5, every=1)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8) + i, torch.zeros(4)) for i in range(3)]  # means 0, 1, 2
    average.recompute_bn(batches, 8, device=torch.device("cpu"), amp=False, channels_last=True)
    images = torch.cat([x for x, _ in batches[:2]])  # the first 8 images: the third batch is not seen
    torch.testing.assert_close(average.model[1].running_mean, images.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert not average.model.training and model[1].running_mean.abs().max() == 0  # the trained model is untouched
    average.update()  # the next update takes the trained model's statistics again
    assert torch.equal(average.model[1].running_mean, model[1].running_mean)


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["recompute", "copy"])
def test_what_is_evaluated_and_saved_is_the_average(tiny_cifar, tmp_path, monkeypatch, capsys, bn):
    evaluated = []

    def evaluate(model, *args, **kwargs):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", evaluate)
    args = tiny_train_args(tiny_cifar, tmp_path, "--epochs", "1", "--ema", "0.9", "--ema-every", "1", "--ema-bn", bn)
    assert train.main(args) == 0  # one epoch: it is the best one
    assert "ema 0.9 every 1 steps" in capsys.readouterr().out
    best, last = load_checkpoint(tmp_path / train.BEST_NAME), load_checkpoint(tmp_path / train.LAST_NAME)
    average, raw = last["ema"]["model"], last["model"]
    assert last["ema"]["updates"] == 2  # 120 training images in batches of 64
    assert best["model"].keys() == average.keys() == raw.keys() == evaluated[0].keys()
    assert all(torch.equal(best["model"][k], average[k]) and torch.equal(evaluated[0][k], average[k]) for k in raw)
    assert not all(torch.equal(raw[k], average[k]) for k in raw)
    statistics = [k for k in raw if k.endswith(("running_mean", "running_var"))]
    if bn == "copy":  # the trained model's, copied at the update after the last step
        assert all(torch.equal(average[k], raw[k]) for k in statistics)
    else:  # measured anew for the averaged weights: other numbers in every BatchNorm layer
        assert not any(torch.equal(average[k], raw[k]) for k in statistics)
        assert average["bn1.num_batches_tracked"].item() == 2  # 120 images in batches of 64: two batches


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_the_average_exactly(tiny_cifar, tmp_path, monkeypatch, capsys):
    # 3 epochs of 2 steps, an update every 3rd step of the run: at steps 3 and 6, in the middle of
    # epoch 2 and at the end of epoch 3, so the steps must be counted over the whole run.
    flags = ("--epochs", "3", "--ema", "0.5", "--ema-every", "3")
    reference = tmp_path / "reference"
    assert train.main(tiny_train_args(tiny_cifar, reference, *flags)) == 0
    out = tmp_path / "stopped"
    stop_at_training_step(monkeypatch, 3)  # epoch 2, after its first step
    assert train.main(tiny_train_args(tiny_cifar, out, *flags)) == 128 + signal.SIGINT
    assert "stopped by signal 2 in epoch 2 at step 1/2" in capsys.readouterr().out
    assert load_checkpoint(out / train.LAST_NAME)["ema"]["updates"] == 1
    monkeypatch.undo()
    assert train.main(["--resume", str(out / train.LAST_NAME)]) == 0
    assert_same_run(final_state(reference), final_state(out))
    a, b = (load_checkpoint(folder / train.LAST_NAME)["ema"] for folder in (reference, out))
    assert a["updates"] == b["updates"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ema_with_reload_best_is_refused_in_one_line(tiny_cifar, tmp_path, capsys):
    assert train.main(tiny_train_args(tiny_cifar, tmp_path, "--ema", "0.99", "--reload-best")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ema and --reload-best:") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_last_pth_without_its_average_is_refused(tiny_cifar, tmp_path, capsys):
    assert train.main(tiny_train_args(tiny_cifar, tmp_path, "--epochs", "1", "--ema", "0.9")) == 0
    ckpt = load_checkpoint(tmp_path / train.LAST_NAME)
    del ckpt["ema"]
    damaged = tmp_path / "damaged.pth"
    save_checkpoint(ckpt, damaged)  # with a digest of its own: only the missing average is wrong
    assert train.main(["--resume", str(damaged), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: {damaged}: holds no weight average" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--ema", "1"], "--ema: '1' is not a number in [0, 1)"),
    (["--ema-every", "0"], "--ema-every: '0' is not a positive integer"),
])
def test_bad_ema_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
