"""The training loop and its CLI: outputs, best-weights reload, exact resume, bad input."""
import json
import signal
import types

import pytest
import torch
import torch.nn.functional as F

import train
import training.run
from conftest import assert_same_run, final_state, stop_at_training_step, tiny_train_args
from model import resnet9
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig, get_args_parser

PNG = b"\x89PNG\r\n\x1a\n"


def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = resnet9()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    before = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = F.cross_entropy(model(x), y)
    assert after.item() < before.item() - 0.01


def test_defaults_are_the_papers_recipe_and_every_field_is_a_flag():
    cfg = TrainConfig()
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == \
        ("resnet9", 100, 64, 0.01, 0.9, 0.0)
    assert not cfg.reload_best and cfg.val_size == 5000
    options = get_options()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in options
    assert {"--resume", "--amp", "--reload-best", "--no-reload-best", "--channels-last"} <= options


def get_options():
    return {s for a in get_args_parser()._actions for s in a.option_strings}


def test_cli_run_writes_best_last_history_and_plots(trained_run):
    best = load_checkpoint(trained_run / train.BEST_NAME)
    last = load_checkpoint(trained_run / train.LAST_NAME)
    assert best["kind"] == "best" and best["config"]["epochs"] == 2 and isinstance(best["config"], dict)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best["model"])
    model_from_checkpoint(best)  # the config alone rebuilds the model
    assert last["epoch"] == 2 and last["progress"]["epoch"] == 2 and "state" in last["optimizer"]
    assert {"torch", "numpy", "python", "cuda"} <= set(last["rng"])
    history = json.loads((trained_run / train.HISTORY_NAME).read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history == last["progress"]["history"]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "improved"} <= set(history[0])
    assert history[0]["improved"] and best["epoch"] == max(h["epoch"] for h in history if h["improved"])
    for name in ("loss_curve.png", "accuracy_curve.png"):
        assert (trained_run / name).read_bytes()[:8] == PNG and (trained_run / name).stat().st_size > 5000
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def _scripted_accuracies(monkeypatch, accuracies):
    """Make the selection evaluation return these accuracies, epoch after epoch."""
    scores = iter(accuracies)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"loss": 1.0, "acc": next(scores), "n": 20})


@pytest.mark.slow
@pytest.mark.parametrize("reload_best", [True, False])
def test_best_weights_are_reloaded_after_a_worse_epoch(tiny_cifar, tmp_path, monkeypatch, reload_best):
    _scripted_accuracies(monkeypatch, [50.0, 40.0, 30.0])
    flag = ["--reload-best"] if reload_best else []  # the default saves the best and goes on
    assert train.main(tiny_train_args(tiny_cifar, tmp_path, "--epochs", "3", *flag)) == 0
    best = load_checkpoint(tmp_path / train.BEST_NAME)
    last = load_checkpoint(tmp_path / train.LAST_NAME)
    assert best["epoch"] == 1 and best["metrics"]["val_acc"] == 50.0  # never replaced by a worse epoch
    same = all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert same == reload_best
    history = last["progress"]["history"]
    assert [h["reloaded"] for h in history] == [False, reload_best, reload_best]


@pytest.mark.slow
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tiny_cifar, trained_run, tmp_path):
    out = tmp_path / "split"
    assert train.main(tiny_train_args(tiny_cifar, out, "--no-reload-best", "--epochs", "1")) == 0
    assert train.main(["--resume", str(out / train.LAST_NAME), "--epochs", "2"]) == 0
    assert_same_run(final_state(trained_run), final_state(out))


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["device", "torchvision"])
def test_ctrl_c_mid_epoch_saves_and_resume_is_exact(tiny_cifar, tmp_path, monkeypatch, capsys, loader):
    reference = tmp_path / "reference"
    assert train.main(tiny_train_args(tiny_cifar, reference, "--no-reload-best", "--loader", loader)) == 0
    out = tmp_path / "stopped"
    stop_at_training_step(monkeypatch, 3)  # epoch 2 has 2 steps: stop after its first
    assert train.main(tiny_train_args(tiny_cifar, out, "--no-reload-best", "--loader", loader)) == 128 + signal.SIGINT
    assert "stopped by signal 2 in epoch 2 at step 1/2" in capsys.readouterr().out
    saved = load_checkpoint(out / train.LAST_NAME)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["step"] == 1
    monkeypatch.undo()
    assert train.main(["--resume", str(out / train.LAST_NAME), "--workers", "1"]) == 0
    assert_same_run(final_state(reference), final_state(out))


@pytest.mark.slow
def test_val_size_zero_selects_on_test_as_the_paper(tiny_cifar, tmp_path, capsys):
    args = tiny_train_args(tiny_cifar, tmp_path, "--val-size", "0")  # 2 epochs: 1 would test once, selecting nothing
    assert train.main(args) == 0
    text = capsys.readouterr().out
    assert "selecting on 50 test images (the paper protocol: optimistic)" in text
    assert "test loss" in text


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: '0' is not a positive integer"),
    (["--epochs", "-3"], "--epochs: '-3' is not a positive integer"),
    (["--batch-size", "0"], "--batch-size: '0' is not a positive integer"),
    (["--lr", "nan"], "--lr: 'nan' is not a positive finite number"),
    (["--lr", "-0.1"], "--lr: '-0.1' is not a positive finite number"),
    (["--momentum", "1.5"], "--momentum"),
    (["--workers", "-2"], "--workers: '-2' is not"),
    (["--device", "tpu"], "--device: 'tpu' is not"),
    (["--val-size", "x"], "--val-size: 'x' is not an integer"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_is_one_clear_error(tiny_cifar, tmp_path, capsys):
    assert train.main(tiny_train_args(tiny_cifar, tmp_path) + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no CUDA GPU") and err.count("\n") == 1


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss
    monkeypatch.setattr(training.run, "F", types.SimpleNamespace(cross_entropy=exploding))
    assert train.main(tiny_train_args(tiny_cifar, tmp_path, "--epochs", "3")) == 1
    assert "non-finite in epoch 2" in capsys.readouterr().err
    last = load_checkpoint(tmp_path / train.LAST_NAME)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert load_checkpoint(tmp_path / train.BEST_NAME)["epoch"] == 1


def test_resume_keeps_the_recipe_and_takes_only_last_pth(trained_run, capsys):
    assert train.main(["--resume", str(trained_run / train.LAST_NAME), "--lr", "0.1"]) == 2
    assert "--lr 0.1 differs from the resumed run's 0.01" in capsys.readouterr().err
    assert train.main(["--resume", str(trained_run / train.BEST_NAME)]) == 2
    assert "not a last.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_another_runs_output_is_not_overwritten_without_flag(tiny_cifar, trained_run, tmp_path, capsys):
    before = (trained_run / train.BEST_NAME).read_bytes()
    assert train.main(tiny_train_args(tiny_cifar, trained_run, "--epochs", "1")) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert (trained_run / train.BEST_NAME).read_bytes() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / train.BEST_NAME).write_bytes(before)
    assert train.main(tiny_train_args(tiny_cifar, copy, "--epochs", "1", "--overwrite")) == 0
    assert (copy / train.BEST_NAME).read_bytes() != before


def test_unwritable_output_fails_before_training(tiny_cifar, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train.main(tiny_train_args(tiny_cifar, blocker / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and err.count("\n") == 1


@pytest.mark.slow
def test_plain_run_beside_a_shipped_checkpoint_writes_elsewhere(tiny_cifar, trained_run, tmp_path, monkeypatch,
                                                                capsys):
    """`python train.py` with no --out, where model/ already holds a checkpoint (the shipped one):
    the run goes to a new folder under runs/, says so in one line, and leaves model/ as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    shipped = (trained_run / train.BEST_NAME).read_bytes()
    (tmp_path / "model" / train.BEST_NAME).write_bytes(shipped)
    args = ["--data-dir", str(tiny_cifar), "--epochs", "1", "--val-size", "20", "--workers", "0", "--device", "cpu",
            "--no-amp"]
    assert train.main(args) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: model/"))
    assert "--out model --overwrite replaces them" in note
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / train.BEST_NAME).is_file() and (runs[0] / train.LAST_NAME).is_file()
    assert (tmp_path / "model" / train.BEST_NAME).read_bytes() == shipped
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [train.BEST_NAME]


@pytest.mark.slow
def test_the_run_says_its_speed_once_from_its_first_steps(tiny_cifar, tmp_path, capsys):
    """The expected length comes from the speed measured here (not a constant), said once per run."""
    assert train.main(tiny_train_args(tiny_cifar, tmp_path, "--subset", "64", "--batch-size", "8")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed: ")]
    assert len(lines) == 1
    rate = float(lines[0].split()[1].replace(",", ""))
    assert rate > 0 and "measured over" in lines[0] and "the 2 epochs left" in lines[0]


@pytest.mark.slow
def test_eval_every_evaluates_every_nth_epoch_and_the_last(tiny_cifar, tmp_path, monkeypatch, capsys):
    """--eval-every 2 over 5 epochs: the selection split after epochs 2, 4 and 5 only; the others have
    null selection numbers, are never the best, and the curves, resume and evaluate.py take them."""
    import evaluate
    calls = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = tiny_train_args(tiny_cifar, tmp_path, "--epochs", "5", "--eval-every", "2", "--subset", "40",
                           "--batch-size", "20")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "after every 2 epochs and the last" in out
    assert len(calls) == 3 and out.count("val (not evaluated)") == 2
    history = json.loads((tmp_path / train.HISTORY_NAME).read_text())
    assert [h["val_acc"] is not None for h in history] == [False, True, False, True, True]
    assert not any(h["improved"] for h in history if h["val_acc"] is None)
    best = load_checkpoint(tmp_path / train.BEST_NAME)
    assert best["epoch"] in (2, 4, 5) and best["epoch"] == max(h["epoch"] for h in history if h["improved"])
    assert evaluate.history_problem(best["history"]) is None
    assert (tmp_path / "accuracy_curve.png").read_bytes()[:8] == PNG
    # a damaged row (null train numbers) is still refused; null selection numbers are not a problem
    assert evaluate.history_problem([{**history[0], "train_acc": None}]) is not None
    # the schedule is the epoch's number: a finished run extended with --resume --epochs keeps it
    split = tmp_path / "split"
    assert train.main(tiny_train_args(tiny_cifar, split, "--epochs", "3", "--eval-every", "2", "--subset", "40",
                                      "--batch-size", "20")) == 0
    assert [h["val_acc"] is not None for h in json.loads((split / train.HISTORY_NAME).read_text())] == \
        [False, True, True]  # 3 was the last epoch then
    assert train.main(["--resume", str(split / train.LAST_NAME), "--epochs", "5"]) == 0
    resumed = json.loads((split / train.HISTORY_NAME).read_text())
    assert [h["val_acc"] is not None for h in resumed] == [False, True, True, True, True]


def test_eval_every_is_part_of_the_recipe():
    from training.config import RECIPES, fresh_config
    assert fresh_config({}).eval_every == 1  # the paper evaluated after every epoch
    assert fresh_config({"recipe": "fast"}).eval_every == RECIPES["fast"]["eval_every"] > 1
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--eval-every", "0"])


def test_fit_starts_a_new_run_from_the_weights_given_and_a_config_of_other_widths(tiny_cifar, tmp_path, capsys):
    """The hook prune.py fine-tunes with: the model is built of the config's widths and starts from the weights."""
    widths = [16, 16, 24, 24, 32, 32, 40, 40]
    torch.manual_seed(3)
    start = resnet9(widths=widths).state_dict()
    cfg = TrainConfig(widths=widths, epochs=1, lr=1e-12, val_size=20, workers=0, device="cpu", amp=False,
                      data_dir=str(tiny_cifar), out=str(tmp_path))
    assert train.fit(cfg, device=torch.device("cpu"), initial_weights=start) == 0
    trained = load_checkpoint(tmp_path / train.LAST_NAME)["model"]
    convs = [k for k in start if k.endswith(("conv1.weight", "conv2.weight"))]
    assert all(torch.allclose(trained[k], start[k], atol=1e-9) for k in convs)  # lr 1e-12: still the given weights
    torch.manual_seed(cfg.seed)
    seeded = resnet9(widths=widths)  # what the run would have started from without them
    assert not torch.allclose(trained["conv1.weight"], seeded.state_dict()["conv1.weight"])
    assert model_from_checkpoint(load_checkpoint(tmp_path / train.BEST_NAME)).conv1.out_channels == 16
