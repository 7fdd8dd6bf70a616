"""Write faults: a full disk, a read-only folder, a file where a folder is needed (docs/reliability.md,
"Write faults"). Each ends in one `error:` line and a non-zero exit, with no traceback;
what was saved before still loads, and `--resume` continues from it once there is room.

The disks are real: small tmpfs mounts (conftest's `tmpfs`), filled by the run's own files or by a
filler file at a chosen moment, and remounted read-only or larger. Where mounting is not allowed
the tests that need it skip and say why; the full-disk test then still runs, against a `torch.save`
that fails half-way as the real one does. A file where a folder is needed is tested in
test_faults.py (train.py's --out), test_export.py (--out) and here (evaluate.py's --out-dir). Under
torchrun: test_distributed.py.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_faults import _cli, _one_clear_line

import data
import evaluate
import export
import train
import training.run
from conftest import remount, save_breaking_on, tiny_train_args
from files import writes
from reports import plots
from training.checkpoint import load_checkpoint

BEST, LAST, HISTORY = train.BEST_NAME, train.LAST_NAME, train.HISTORY_NAME
QUICK = ("--subset", "24", "--batch-size", "8")  # 3 steps an epoch; the checkpoints keep their full size


# ----------------------------------------------------------------------------- disks

def _fill(where: Path, leave: int = 0) -> Path:
    """Take all the free space of `where`'s disk but `leave` bytes, with one file (delete it to give it back)."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, shutil.disk_usage(where).free - leave))
    return filler


def _temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def _disk_full() -> None:
    """What torch.save raises on a full disk: the OSError, then its zip writer's RuntimeError."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def _failing_save(name: str) -> Callable:
    """torch.save as it fails on a full disk, for writes of `name`: half the bytes reach the file, then
    the OSError, then torch's zip writer raises RuntimeError while handling it."""
    return save_breaking_on(name, _disk_full)


# ----------------------------------------------------------------------------- telling a failed write

def test_what_counts_as_a_failed_write_and_its_words(tmp_path):
    """Root may write anywhere, so permission-denied is checked here on the exception, with the other
    kinds: torch's RuntimeError raised while an OSError is handled is the OSError's failure, a network
    error or another RuntimeError is none."""
    target = tmp_path / "x.pth"

    def chained(first: OSError) -> RuntimeError:
        try:
            raise first
        except OSError:
            try:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            except RuntimeError as e:
                return e
    denied = writes.write_error(PermissionError(errno.EACCES, "Permission denied"), target, "the checkpoint")
    assert str(denied) == (f"cannot write the checkpoint {target}: permission denied; pick a writable folder (or "
                           "allow writing to this one)") and not denied.disk_full
    full = writes.write_error(chained(OSError(errno.ENOSPC, "No space left on device")), target, "the checkpoint",
                              needed=39_300_000)
    assert re.fullmatch(rf"cannot write the checkpoint {re.escape(str(target))}: no space left on its disk \(\S+ "
                        r"[KMG]?B free, about 39.3 MB needed\); free some space there", str(full)) and full.disk_full
    assert writes.write_error(urllib.error.URLError("no network"), target, "x") is None
    assert writes.write_error(RuntimeError("CUDA out of memory"), target, "x") is None
    assert str(full.explained("a.pth holds epoch 1", "resume")).endswith("; a.pth holds epoch 1; free some space "
                                                                         "there, then resume")
    assert pickle.loads(pickle.dumps(full)).disk_full  # as torch.distributed hands it to the other processes


# ----------------------------------------------------------------------------- train.py

@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "failing_torch_save"])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues(tiny_cifar, trained_run, tmp_path, tmpfs,
                                                                     monkeypatch, capsys, how):
    """The issue's case: --out on a small disk that the run's own checkpoints fill at the end of epoch 2.
    The disk has room for the start-up check (a last.pth and a temporary copy) but not for a second
    last.pth beside the first one and the best checkpoint."""
    last, best = ((trained_run / name).stat().st_size for name in (LAST, BEST))
    real_save, failing_save, calls = torch.save, _failing_save(LAST), {"n": 0}
    if how == "tmpfs":
        out = tmpfs(f"{(2 * last + best // 2) // 1024}k") / "run"
    else:
        out = tmp_path / "run"

        def second_last_pth_fails(obj, f, *args, **kwargs):  # epoch 1's last.pth and best go through
            calls["n"] += Path(getattr(f, "name", "")).name.startswith(f".{LAST}.")
            return (failing_save if calls["n"] >= 2 else real_save)(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", second_last_pth_fails)
    code = train.main(tiny_train_args(tiny_cifar, out, "--no-reload-best"))
    err = capsys.readouterr().err
    _one_clear_line(code, err, f"error: cannot write the checkpoint {out / LAST}: no space left on its disk (",
                    f"; {out / LAST} holds the state after epoch 1; free some space there, then continue with: "
                    f"python train.py --resume {out / LAST}", expect=1)
    if how == "tmpfs":
        assert "free, about 39.3 MB needed)" in err
    assert not _temporary_files(out)
    assert load_checkpoint(out / LAST)["epoch"] == 1 and load_checkpoint(out / BEST)["epoch"] == 1
    assert [row["epoch"] for row in json.loads((out / HISTORY).read_text())] == [1]

    if how == "tmpfs":
        remount(out.parent, f"size={4 * last // 1024}k")
    else:
        monkeypatch.setattr(torch, "save", real_save)
    assert train.main(["--resume", str(out / LAST)]) == 0
    assert "epoch   2/2 |" in capsys.readouterr().out
    assert [h["epoch"] for h in load_checkpoint(out / LAST)["progress"]["history"]] == [1, 2]


@pytest.mark.slow
def test_a_read_only_disk_mid_run_is_one_line_and_resume_continues(tiny_cifar, tmpfs, monkeypatch, capsys):
    where = tmpfs("200m")
    out = where / "run"
    real_evaluate, calls = train.evaluate, {"n": 0}

    def evaluate_then_remount_read_only(*args, **kwargs):  # the disk turns read-only before epoch 2's writes
        calls["n"] += 1
        if calls["n"] == 2:
            remount(where, "ro")
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", evaluate_then_remount_read_only)
    code = train.main(tiny_train_args(tiny_cifar, out, *QUICK))
    _one_clear_line(code, capsys.readouterr().err, f"error: cannot write the checkpoint {out / LAST}: its file "
                    f"system is read-only; {out / LAST} holds the state after epoch 1; pick a writable folder",
                    f"continue with: python train.py --resume {out / LAST} (and --out DIR to write elsewhere)",
                    expect=1)
    assert load_checkpoint(out / LAST)["epoch"] == 1 and load_checkpoint(out / BEST)["epoch"] == 1
    remount(where, "rw")
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert train.main(["--resume", str(out / LAST)]) == 0
    assert load_checkpoint(out / LAST)["epoch"] == 2 and not _temporary_files(out)


@pytest.mark.slow
@pytest.mark.parametrize("fails", [BEST, HISTORY, "loss_curve.png"])
def test_a_disk_that_fills_between_two_writes_keeps_the_rest(tiny_cifar, tmpfs, monkeypatch, capsys, fails):
    """The disk fills just before one of the later writes of a 1-epoch run: the best checkpoint (after
    last.pth), history.json (after both checkpoints) or the curves (at the end). The line names that
    file; a resume once there is room writes it and ends."""
    where = tmpfs("200m")
    out, real_save, real_curves = where / "run", training.run.save_checkpoint, plots.save_curves

    def save_then_fill(obj, path):
        real_save(obj, path)
        if Path(path).name == {BEST: LAST, HISTORY: BEST}.get(fails):
            _fill(where)
    monkeypatch.setattr(training.run, "save_checkpoint", save_then_fill)
    if fails == "loss_curve.png":
        monkeypatch.setattr(plots, "save_curves", lambda *args: (_fill(where), real_curves(*args))[1])
    code = train.main(tiny_train_args(tiny_cifar, out, "--epochs", "1", *QUICK))
    what = "the checkpoint" if fails == BEST else "the history" if fails == HISTORY else "the figure"
    _one_clear_line(code, capsys.readouterr().err, f"error: cannot write {what} {out / fails}: no space left on "
                    f"its disk (", f"{out / LAST} holds the state after epoch 1; free some space there, then continue "
                    f"with: python train.py --resume {out / LAST}", expect=1)
    assert not _temporary_files(out) and load_checkpoint(out / LAST)["epoch"] == 1
    if fails != BEST:
        assert load_checkpoint(out / BEST)["epoch"] == 1

    (where / "filler").unlink()
    monkeypatch.setattr(training.run, "save_checkpoint", real_save)
    monkeypatch.setattr(plots, "save_curves", real_curves)
    assert train.main(["--resume", str(out / LAST)]) == 0
    text = capsys.readouterr().out
    assert ("not written when the run stopped; written now" in text) == (fails == BEST) and "done: 1 epochs" in text
    assert load_checkpoint(out / BEST)["epoch"] == 1 and (out / "loss_curve.png").is_file()
    assert json.loads((out / HISTORY).read_text()) == load_checkpoint(out / LAST)["progress"]["history"]


@pytest.mark.parametrize("case", ["too_small", "read_only"])
def test_an_out_that_cannot_take_a_checkpoint_is_refused_before_training(tiny_cifar, tmpfs, capsys, case):
    """Said before any data is read or any epoch trained, and no folder is left behind. The free
    space said is the disk's less the one page of --out's lock file (files/lock.py)."""
    where = tmpfs("8m") if case == "too_small" else tmpfs("8m", ro=True)
    out = where / "new" / "run"
    code = train.main(tiny_train_args(tiny_cifar, out))
    captured = capsys.readouterr()
    needle = ("only 8.38 MB free on its disk, about 78.6 MB needed for an epoch's checkpoints (last.pth is about "
              "39.3 MB, written through a temporary copy); free some space there or pick a folder on another disk"
              if case == "too_small" else "its file system is read-only; pick a writable folder")
    _one_clear_line(code, captured.err, f"error: cannot write to --out {out}: {needle}")
    assert captured.out == "" and list(where.iterdir()) == []


def test_a_failed_tensorboard_write_is_one_line_without_the_writer_threads_traceback(tiny_cifar, tmp_path, tmpfs):
    """TensorBoard's writer thread fails on a full disk; the run stops at the end of the epoch, where
    under torchrun all processes would learn of it, with one line (none from the thread)."""
    logs = tmpfs("8k") / "tb"
    code, _, err = _cli("train.py", tiny_train_args(tiny_cifar, tmp_path / "run", *QUICK, "--tensorboard", str(logs)),
                        tmp_path / "logs")
    _one_clear_line(code, err, f"error: cannot write the TensorBoard log {logs}: no space left on its disk",
                    f"{tmp_path / 'run' / LAST} holds the state after epoch 1", expect=1)
    assert load_checkpoint(tmp_path / "run" / LAST)["epoch"] == 1


def test_commands_that_cannot_start_leave_no_folders(trained_run, tmp_path):
    """Offline, in a fresh folder: `python train.py` (which would write to runs/<time>/, model/ holding
    a checkpoint) and `python evaluate.py model/...pth` (eval/<name>/) stop on the missing data set
    and leave neither those folders nor data/ behind; a folder that was there before stays."""
    clone = tmp_path / "clone"
    (clone / "model").mkdir(parents=True)
    shutil.copyfile(trained_run / BEST, clone / "model" / BEST)
    (clone / "eval").mkdir()  # the user's own, empty

    def offline_here() -> None:
        os.chdir(clone)

        def offline(url, root, **kwargs):  # as torchvision: the folder first, then the network
            os.makedirs(root, exist_ok=True)
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        data.download_and_extract_archive = offline
    for script, args in (("train.py", ["--device", "cpu"]), ("evaluate.py", [f"model/{BEST}", "--device", "cpu"])):
        code, _, err = _cli(script, args, tmp_path / f"logs_{script}", offline_here)
        _one_clear_line(code, err, f"error: CIFAR-10 is not in data/{data.FOLDER} and could not be downloaded")
        assert sorted(p.name for p in clone.iterdir()) == ["eval", "model"], script
        assert list((clone / "eval").iterdir()) == [] and list((clone / "model").iterdir()) == [clone / "model" / BEST]


# ----------------------------------------------------------------------------- the data download

def test_a_download_onto_a_full_disk_is_refused_before_it_starts(tmpfs, monkeypatch):
    where = tmpfs("1m")
    monkeypatch.setattr(data, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(data.DataError) as failed:
        data.load_cifar10(where / "data")
    assert (f"CIFAR-10 is not in {where / 'data' / data.FOLDER} and cannot be downloaded to {where / 'data'}: only "
            "1.05 MB free on its disk, about 357 MB needed for the download (170 MB archive, 186 MB extracted); free "
            "some space there or pick a folder on another disk, or download") in str(failed.value)
    assert "\n" not in str(failed.value) and list(where.iterdir()) == []


def test_a_download_that_fills_the_disk_removes_what_it_wrote(tmp_path, monkeypatch):
    def fills_the_disk(url, root, filename, md5):
        os.makedirs(root)
        Path(root, filename).write_bytes(b"x" * 1000)  # the archive in part
        Path(root, data.FOLDER).mkdir()
        Path(root, data.FOLDER, "data_batch_1").write_bytes(b"y" * 10)  # extracted in part
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(data, "download_and_extract_archive", fills_the_disk)
    with pytest.raises(data.DataError, match=r"could not be downloaded \(no space left on its disk \(.* free, about "
                       r"357 MB needed\); free some space there\); download "):
        data.load_cifar10(tmp_path / "new" / "data")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- evaluate.py and export.py

@pytest.mark.slow
def test_evaluate_on_a_full_disk_is_one_line_and_keeps_the_earlier_report(trained_run, tiny_cifar, tmpfs,
                                                                           monkeypatch, capsys):
    where = tmpfs("32m")
    out, args = where / "eval", [str(trained_run / BEST), "--data-dir", str(tiny_cifar), "--device", "cpu",
                                 "--no-robustness"]
    assert evaluate.main([*args, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_load = evaluate.load_test_set
    monkeypatch.setattr(evaluate, "load_test_set", lambda *a: (_fill(where), real_load(*a))[1])
    code = evaluate.main([*args, "--out-dir", str(out)])
    _one_clear_line(code, capsys.readouterr().err, f"error: cannot write the figure {out / 'confusion_matrix.png'}: "
                    "no space left on its disk (", "free some space there, then run the same command again", expect=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not _temporary_files(out)

    monkeypatch.setattr(evaluate, "load_test_set", real_load)
    code = evaluate.main([*args, "--out-dir", str(where / "other")])
    _one_clear_line(code, capsys.readouterr().err, f"error: cannot write to --out-dir {where / 'other'}: only ",
                    "free on its disk, about 2 MB needed for the report and its figures")
    assert not (where / "other").exists()


def test_an_out_dir_below_a_file_is_refused_before_the_test_set_is_read(trained_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = evaluate.main([str(trained_run / BEST), "--data-dir", str(tmp_path / "absent"), "--out-dir",
                          str(blocker / "eval"), "--device", "cpu"])
    _one_clear_line(code, capsys.readouterr().err, f"error: cannot write to --out-dir {blocker / 'eval'}: {blocker} "
                    "is a file, where a folder is needed; move that file away or pick a writable folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # not even data/: the data set was not looked for


@pytest.mark.parametrize("case", ["fills_while_written", "too_small"])
def test_export_on_a_full_disk_is_one_line_and_keeps_the_earlier_file(trained_run, tmpfs, monkeypatch, capsys, case):
    pytest.importorskip("safetensors", reason="safetensors is optional: pip install -r requirements-optional.txt")
    where = tmpfs("32m" if case == "fills_while_written" else "8m")
    out = where / "resnet9.safetensors"
    out.write_bytes(b"an earlier export")
    real_check = export.check_writable
    monkeypatch.setattr(export, "check_writable", lambda *a: (real_check(*a), _fill(where))[0])
    code = export.main([str(trained_run / BEST), "--format", "safetensors", "--out", str(out)])
    if case == "fills_while_written":
        _one_clear_line(code, capsys.readouterr().err, f"error: cannot write the safetensors file {out}: no space "
                        "left on its disk (", "about 19.7 MB needed); free some space there, then run the same "
                        "command again", expect=1)
    else:
        _one_clear_line(code, capsys.readouterr().err, f"error: --out {out}: cannot write there (only ",
                        "about 19.7 MB needed for the exported file); free some space there")
    assert out.read_bytes() == b"an earlier export" and not _temporary_files(where)
