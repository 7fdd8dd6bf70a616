"""train.py --tensorboard: the event files hold the numbers of history.json, the sync-point losses add
up to the epoch's loss without a host sync more, the grid, the confusion matrix and the hparams are
there, only rank 0 writes under torchrun, and a missing package is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import ROOT, tiny_train_args
from data import CLASSES, load_cifar10
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.device_loader import DeviceLoader
from training.run import build_training
from training.runtime import Distributed, StopFlag
from training.step import make_step
from training.tensorboard_log import epoch_tags

pytest.importorskip("tensorboard", reason="tensorboard is optional: pip install -r requirements-optional.txt")


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = list(folder.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator, files


def _scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _confusion(acc, tag: str) -> tuple[np.ndarray, list[str], str]:
    """The counts, row names and whole text of the confusion matrix's table."""
    text = acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()  # add_text adds the suffix
    rows = [line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| true", "| ---"))]
    return np.array([[int(v) for v in row[1:]] for row in rows]), [row[0] for row in rows], text


@pytest.fixture(scope="module")
def logged_run(tiny_cifar, tmp_path_factory):
    """A 2-epoch tiny run with --tensorboard and no folder: it logs to runs/<run id> under the cwd."""
    work = tmp_path_factory.mktemp("tb")
    cwd = Path.cwd()
    try:
        os.chdir(work)
        assert train.main(tiny_train_args(tiny_cifar, work / "out", "--tensorboard")) == 0
    finally:
        os.chdir(cwd)
    run_id = load_checkpoint(work / "out" / train.LAST_NAME)["progress"]["run_id"]
    return work / "runs" / run_id, json.loads((work / "out" / train.HISTORY_NAME).read_text())


def test_event_files_hold_the_numbers_of_history_json(logged_run):
    folder, history = logged_run
    acc, files = _events(folder)
    assert len(files) == 1 and not [p for p in folder.iterdir() if p.is_dir()]  # one run: hparams included
    for tag, key in epoch_tags("val").items():
        logged = _scalars(acc, tag)
        assert sorted(logged) == [h["epoch"] for h in history], tag
        for row in history:  # TensorBoard keeps float32
            assert logged[row["epoch"]] == pytest.approx(row[key], rel=1e-6, abs=1e-6), (tag, row["epoch"])
    assert all(h["images_per_second"] > 0 for h in history)


def test_sync_point_losses_add_up_to_the_epoch_loss(logged_run):
    """120 training images in batches of 64: two steps an epoch, a sync point after each, so the two
    window means weighted by 64 and 56 images are the epoch's mean training loss."""
    folder, history = logged_run
    acc, _ = _events(folder)
    steps = _scalars(acc, "train_steps/loss")
    assert sorted(steps) == [1, 2, 3, 4]  # the run's optimizer steps
    for row, (a, b) in zip(history, ((1, 2), (3, 4)), strict=True):
        assert (64 * steps[a] + 56 * steps[b]) / 120 == pytest.approx(row["train_loss"], rel=1e-5)


def test_grid_confusion_matrix_and_hparams_are_logged(logged_run):
    folder, history = logged_run
    acc, _ = _events(folder)
    (grid,) = acc.Images("training/augmented_images")
    assert grid.width > 8 * 32 and grid.height > 8 * 32 and grid.step == 0
    assert acc.Images("confusion_matrix/val")  # the figure
    cm, names, text = _confusion(acc, "confusion_matrix/val")
    assert cm.shape == (10, 10) and names == list(CLASSES)
    best = max(history, key=lambda h: h["val_acc"])
    # The default goes on after the best epoch, so the matrix is the last epoch's weights'
    # (with --reload-best it would be the best weights', and say so).
    last = history[-1]
    assert cm.sum() == 20 and 100 * np.trace(cm) / cm.sum() == pytest.approx(last["val_acc"])
    assert f"last epoch's weights (epoch {last['epoch']})" in text
    assert acc.PluginTagToContent("hparams")  # the HPARAMS tab's session data
    assert _scalars(acc, "hparam/best_val_acc")[0] == pytest.approx(best["val_acc"], rel=1e-6)
    assert _scalars(acc, "hparam/final_train_loss")[0] == pytest.approx(history[-1]["train_loss"], rel=1e-6)


def test_logging_adds_no_host_sync(tiny_cifar, monkeypatch):
    """The same epoch with and without the sync-point callback makes the same host reads of tensors."""
    data = load_cifar10(tiny_cifar)
    cpu, reads = torch.device("cpu"), []
    for name in ("tolist", "item", "cpu", "numpy", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            (reads.append(_name), _real(self, *a, **k))[1])
    counts, logged = [], []
    for on_sync in (None, lambda step, loss_sum, n: logged.append((step, loss_sum, n))):
        model, optimizer = build_training(TrainConfig(), cpu, Distributed())
        step = make_step(model, optimizer, F.cross_entropy, device=cpu, amp=False, channels_last=False,
                         cuda_graph=False, batch_size=16)
        loader = DeviceLoader(data.train_images[:96], data.train_labels[:96], 16, seed=0, device=cpu)
        loader.set_epoch(1)
        reads.clear()
        with StopFlag() as stop:
            train.train_one_epoch(step, loader, stop=stop, sums=torch.zeros(3), on_sync=on_sync)
        counts.append(len(reads))
    assert counts[0] == counts[1] >= 7 and [s for s, _, _ in logged] == [1, 2, 3, 4, 5, 6, 6]
    assert logged[-1][2] == 96  # the epoch's images so far, at each sync point


def test_missing_tensorboard_is_one_line_before_training(tiny_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the optional package were not installed
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "out", "--tensorboard", str(tmp_path / "tb")))
    captured = capsys.readouterr()
    assert code == 2 and captured.err == ("error: --tensorboard needs the tensorboard package: "
                                          "pip install -r requirements-optional.txt\n")
    assert "epoch" not in captured.out and not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_under_torchrun_only_rank_0_writes(tiny_cifar, tmp_path):
    folder = tmp_path / "tb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--device", "cpu", *tiny_train_args(tiny_cifar, tmp_path / "out"),
           "--epochs", "1", "--subset", "32", "--batch-size", "16", "--tensorboard", str(folder)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    acc, files = _events(folder)
    assert len(files) == 1, files  # rank 1 opened no writer
    (row,) = json.loads((tmp_path / "out" / train.HISTORY_NAME).read_text())
    assert _scalars(acc, "loss/train")[1] == pytest.approx(row["train_loss"], rel=1e-6)
    assert _confusion(acc, "confusion_matrix/val")[0].sum() == 20  # both processes' shares of the 20 images


@pytest.mark.slow
def test_a_resumed_run_keeps_logging_to_its_folder(logged_run, tmp_path, monkeypatch):
    """runs/<run id> is stored as `auto` in last.pth and resolves to the same folder on --resume."""
    import shutil
    folder, _ = logged_run
    work = folder.parent.parent
    shutil.copytree(work / "out", tmp_path / "out")
    shutil.copytree(folder, tmp_path / "runs" / folder.name)
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume", str(tmp_path / "out" / train.LAST_NAME), "--out", str(tmp_path / "out"),
                       "--epochs", "3"]) == 0
    acc, files = _events(tmp_path / "runs" / folder.name)
    assert len(files) == 2 and sorted(_scalars(acc, "loss/train")) == [1, 2, 3]
    third = json.loads((tmp_path / "out" / train.HISTORY_NAME).read_text())[2]
    assert _scalars(acc, "accuracy/val")[3] == pytest.approx(third["val_acc"], rel=1e-6)


def test_an_epoch_not_evaluated_logs_no_selection_scalars(tmp_path):
    """train.py --eval-every: an epoch without selection numbers logs its training numbers only."""
    from training.tensorboard_log import TensorBoardLog
    log = TensorBoardLog(tmp_path)
    row = {"epoch": 1, "train_loss": 2.0, "train_acc": 20.0, "val_loss": None, "val_acc": None, "lr": 0.1,
           "images_per_second": 100.0, "seconds": 3.0, "train_seconds": 2.5}
    log.epoch(row, "val")
    log.epoch({**row, "epoch": 2, "val_loss": 1.5, "val_acc": 40.0}, "val")
    log.close()
    acc, _ = _events(tmp_path)
    assert _scalars(acc, "accuracy/train") == {1: 20.0, 2: 20.0}
    assert _scalars(acc, "accuracy/val") == {2: 40.0} and _scalars(acc, "loss/val") == {2: 1.5}


@pytest.mark.slow
def test_a_run_ending_on_an_epoch_not_evaluated_writes_its_summary(tiny_cifar, tmp_path):
    """A last.pth whose last row has no selection numbers (as after an unevaluated epoch), resumed with
    --epochs at that epoch: the run ends there, and the hparams summary leaves those numbers out."""
    out = tmp_path / "out"
    assert train.main(tiny_train_args(tiny_cifar, out, "--epochs", "1", "--eval-every", "2")) == 0
    last = load_checkpoint(out / train.LAST_NAME)
    assert last["progress"]["history"][0]["val_acc"] is not None  # the last epoch is evaluated
    # the same run, made to look stopped after an unevaluated epoch 1 of a longer one
    assert train.main(["--resume", str(out / train.LAST_NAME), "--epochs", "3"]) == 0
    assert [h["val_acc"] is not None for h in json.loads((out / train.HISTORY_NAME).read_text())] == \
        [True, True, True]
    row = {**last["progress"]["history"][0], "val_acc": None, "val_loss": None}
    last["progress"]["history"] = [row]
    torch.save(last, out / "unevaluated.pth")
    assert train.main(["--resume", str(out / "unevaluated.pth"), "--epochs", "1", "--tensorboard",
                       str(tmp_path / "tb")]) == 0
    acc, _ = _events(tmp_path / "tb")
    assert "hparam/final_train_acc" in acc.Tags()["scalars"] and "hparam/final_val_acc" not in acc.Tags()["scalars"]
