"""tune.py: the Optuna search on the tiny folder: a study completes, resumes, prunes, survives a
failing trial and Ctrl-C, is shared by two processes at once, refuses what it cannot do, and its
best command reproduces the best trial."""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna", reason="tune.py needs optuna (requirements-optional.txt)")

import train  # noqa: E402
import tune  # noqa: E402
from conftest import remount  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDY = "s"


def tiny_flags(data: Path, out: Path, *extra: str) -> list[str]:
    """tune.py flags for trials of 2 epochs on 20 of the tiny folder's images, selecting on 20 others."""
    return ["--out", str(out), "--study", STUDY, "--data-dir", str(data), "--epochs", "2", "--val-size", "20",
            "--subset", "20", "--batch-size", "10", "--workers", "0", "--device", "cpu", *extra]


def run_tune(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tune.main(argv)
    return code, out.getvalue(), err.getvalue()


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")


@pytest.fixture(scope="module")
def four_trials(tiny_cifar, tmp_path_factory):
    """One 4-trial study, shared by the tests that only read it (or copy it)."""
    out = tmp_path_factory.mktemp("tune")
    code, stdout, stderr = run_tune(["--trials", "4", *tiny_flags(tiny_cifar, out)])
    return out, code, stdout, stderr


def test_four_trial_study_completes(four_trials):
    out, code, stdout, stderr = four_trials
    assert code == 0, stderr
    trials = load(out).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)  # the median pruner waits for 4 finished trials
    assert trials[0].params == tune.PAPER_POINT and trials[0].user_attrs["paper"]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    for t in trials:  # the objective is the best of the accuracies reported each epoch, on the selection split
        assert sorted(t.intermediate_values) == [1, 2] and t.value == max(t.intermediate_values.values())
        assert t.user_attrs["flags"][-9:-7] == ["--optimizer", t.params["optimizer"].split("-")[0]]
        history = json.loads((out / STUDY / f"trial-{t.number:04d}" / train.HISTORY_NAME).read_text())
        assert [h["val_acc"] for h in history] == [t.intermediate_values[1], t.intermediate_values[2]]
        assert not list((out / STUDY / f"trial-{t.number:04d}").glob("*.pth"))  # checkpoints removed
    assert "selecting on 20 val images" in stdout and " test images" not in stdout
    rows = (out / STUDY / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("number,state,rank,val_acc")
    assert rows[1].split(",")[:2] == ["0", "COMPLETE"] and ",yes," in rows[1]
    for name in ("history.png", "parallel.png", "importances.png"):
        assert (out / STUDY / name).read_bytes()[:4] == b"\x89PNG"
    best = max(trials, key=lambda t: t.value)
    last = stdout.strip().splitlines()[-1]
    assert last == (out / STUDY / "best_command.txt").read_text().strip()
    assert last.startswith("python train.py ") and f"--lr {best.params['lr']:.4g}" in last
    assert "the paper's point (trial 0: sgd lr 0.01 momentum 0.9 no weight decay): rank" in stdout


def test_printed_best_command_runs_and_reproduces_the_trial(four_trials):
    out, _, stdout, _ = four_trials
    words = shlex.split(stdout.strip().splitlines()[-1])
    assert words[:2] == ["python", "train.py"]
    assert train.main(words[2:]) == 0
    history = json.loads((out / STUDY / "best" / train.HISTORY_NAME).read_text())
    assert max(h["val_acc"] for h in history) == load(out).best_value  # same flags, same seed: same result


def test_second_run_resumes_the_study(four_trials, tiny_cifar, tmp_path):
    out = tmp_path / "tune"
    shutil.copytree(four_trials[0], out)
    code, stdout, stderr = run_tune(["--trials", "1", *tiny_flags(tiny_cifar, out)])
    assert code == 0, stderr
    assert "4 finished trial(s) so far; adding 1" in stdout
    trials = load(out).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and trials[4].state.name == "COMPLETE"
    assert trials[4].params not in [t.params for t in trials[:4]]  # a new draw, not trial 0's again
    assert len((out / STUDY / "trials.csv").read_text().splitlines()) == 6


@pytest.mark.slow
def test_a_trial_behind_the_median_is_pruned(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "MEDIAN_STARTUP_TRIALS", 2)
    flags = ["--out", str(tmp_path), "--study", STUDY, "--data-dir", str(tiny_cifar), "--epochs", "3",
             "--val-size", "20", "--subset", "60", "--batch-size", "20", "--workers", "0", "--device", "cpu"]
    assert run_tune(["--trials", "0", *flags])[0] == 1  # creates the study with the paper's point queued
    study = load(tmp_path)
    study.enqueue_trial({"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay_on": False})
    study.enqueue_trial({"optimizer": "sgd", "lr": 1e-4, "momentum": 0.5, "weight_decay_on": False})  # no learning
    code, stdout, stderr = run_tune(["--trials", "3", *flags])
    assert code == 0, stderr
    paper, good, bad = load(tmp_path).trials
    assert paper.state.name == good.state.name == "COMPLETE", stdout
    assert bad.state.name == "PRUNED", (paper.intermediate_values, good.intermediate_values, bad.intermediate_values)
    assert "trial 2: pruned, best val acc " in stdout and "(behind the earlier trials after epoch" in stdout
    assert bad.user_attrs["note"].startswith("behind the earlier trials") and "Traceback" not in stderr
    assert len(bad.intermediate_values) < 3  # never pruned after its last epoch: that would save nothing


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tiny_cifar, tmp_path, monkeypatch):
    real_fit, calls = train.fit, []

    def fit(cfg, **kwargs):
        calls.append(cfg.lr)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nin a kernel")
        if len(calls) == 2:
            raise train.NonFiniteLoss("the training loss became non-finite")
        return real_fit(cfg, **kwargs)

    monkeypatch.setattr(train, "fit", fit)  # under the Hyperband pruner, to run it once too
    flags = tiny_flags(tiny_cifar, tmp_path, "--epochs", "1", "--pruner", "hyperband")
    code, stdout, stderr = run_tune(["--trials", "3", *flags])
    assert code == 0 and len(calls) == 3
    assert "pruner hyperband" in stdout
    failed, diverged, fine = load(tmp_path).trials
    assert failed.state.name == "FAIL"
    assert failed.user_attrs["note"] == "failed: RuntimeError: out of memory in a kernel"  # on one line
    assert diverged.state.name == "PRUNED" and diverged.user_attrs["note"].startswith("diverged")
    assert fine.state.name == "COMPLETE"
    assert "RuntimeError: out of memory" in stderr  # the traceback, to find the cause
    assert "trial 0: fail, no epoch finished (failed: RuntimeError" in stdout
    assert "the paper's point (trial 0: sgd lr 0.01 momentum 0.9 no weight decay): fail" in stdout
    rows = (tmp_path / STUDY / "trials.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["FAIL", "PRUNED", "COMPLETE"]
    assert "importances.png skipped (needs 2 complete trials, the study has 1)" in stdout
    assert (tmp_path / STUDY / "best_command.txt").is_file()


@pytest.mark.slow
def test_a_trial_that_cannot_write_its_checkpoints_stops_the_search_in_one_line(tiny_cifar, tmp_path, monkeypatch):
    """The trials' disk is full: the first trial's last.pth fails half-way (as torch.save fails there).
    No other trial would fare better, so the search stops: one line, exit code 1, no traceback; the
    study keeps the trial, failed with the reason."""
    from test_write_faults import _failing_save
    monkeypatch.setattr(torch, "save", _failing_save(train.LAST_NAME))
    code, stdout, stderr = run_tune(["--trials", "3", *tiny_flags(tiny_cifar, tmp_path, "--epochs", "1")])
    last = tmp_path / STUDY / "trial-0000" / train.LAST_NAME
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: cannot write the checkpoint {last}: no space left on its disk (")
    assert stderr.endswith("; the study keeps every trial that finished before; free some space there, then run the "
                           "same command to add more\n")
    (trial,) = load(tmp_path).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["note"].startswith("failed: cannot write the checkpoint")
    assert not last.parent.exists() or not list(last.parent.glob("*.pth"))
    assert "trial 0: fail" in stdout and (tmp_path / STUDY / "trials.csv").is_file()


def test_a_read_only_study_folder_is_one_line_and_keeps_its_table(tiny_cifar, tmp_path, tmpfs):
    where = tmpfs("16m")
    flags = ["--trials", "0", *tiny_flags(tiny_cifar, where), "--storage", f"sqlite:///{tmp_path / 'study.db'}"]
    assert run_tune(flags)[0] == 1  # no trial: nothing is best
    table = where / STUDY / "trials.csv"
    before = table.read_bytes()
    remount(where, "ro")
    code, _, stderr = run_tune(flags)
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"error: cannot write the table {table}: its file system is read-only; the study keeps "
                             "every trial that finished before; pick a writable folder")
    assert table.read_bytes() == before


@pytest.mark.slow
def test_a_study_database_that_cannot_be_written_is_one_line(tiny_cifar, tmp_path, tmpfs, monkeypatch):
    """The SQLite study on its own small disk: the disk fills while the first trial trains (its first
    report to the study fails: the search stops, exit code 1); then a copy of the study on a read-only
    disk (it cannot take a trial: refused at the start, exit code 2)."""
    where = tmpfs("16m")
    flags = [*tiny_flags(tiny_cifar, tmp_path, "--epochs", "1"), "--storage", f"sqlite:///{where / 'study.db'}"]
    real_fit = train.fit

    def fill_then_fit(cfg, **kwargs):
        from test_write_faults import _fill
        _fill(where)
        return real_fit(cfg, **kwargs)
    monkeypatch.setattr(train, "fit", fill_then_fit)
    code, _, stderr = run_tune(["--trials", "2", *flags])
    assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert re.match(rf"error: cannot write the study {where / 'study.db'}: (no space left on its disk|input/output "
                    r"error).*; the study keeps every trial that finished before; .*then run the same command", stderr)
    monkeypatch.setattr(train, "fit", real_fit)
    read_only = tmpfs("16m")  # another disk: this process still holds the first one's database open
    shutil.copyfile(where / "study.db", read_only / "study.db")
    remount(read_only, "ro")
    flags[-1] = f"sqlite:///{read_only / 'study.db'}"
    code, _, stderr = run_tune(["--trials", "1", *flags])
    assert code == 2 and stderr == (f"error: cannot write the study {read_only / 'study.db'}: its file system is "
                                    "read-only; the study keeps every trial that finished before; pick a writable "
                                    "folder (or make this one writable), then run the same command to add more\n")


def test_ctrl_c_ends_the_running_trial_and_keeps_the_study(tiny_cifar, tmp_path, monkeypatch):
    real_fit = train.fit

    def fit(cfg, *, after_epoch, **kwargs):
        def interrupt_then_report(run):
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the first epoch
            after_epoch(run)
        return real_fit(cfg, after_epoch=interrupt_then_report, **kwargs)

    monkeypatch.setattr(train, "fit", fit)
    handler = signal.getsignal(signal.SIGINT)
    code, stdout, stderr = run_tune(["--trials", "3", *tiny_flags(tiny_cifar, tmp_path)])
    assert code == 130
    (trial,) = load(tmp_path).trials  # the other two trials never started
    assert trial.state.name == "FAIL" and trial.user_attrs["note"] == "interrupted by signal 2"
    assert list(trial.intermediate_values) == [1]
    assert "the study keeps every finished trial" in stderr and "Traceback" not in stderr
    assert "(trial 0: sgd lr 0.01 momentum 0.9 no weight decay): fail, best val acc" in stdout
    assert (tmp_path / STUDY / "trial-0000" / train.LAST_NAME).is_file()  # the message before says to resume it
    assert "interrupted by signal 2" in (tmp_path / STUDY / "trials.csv").read_text()
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    assert run_tune(["--trials", "0", *tiny_flags(tiny_cifar, tmp_path)])[0] == 1  # no best yet: exit 1
    again, queued = load(tmp_path).trials  # the paper's point is queued again, to be measured after all
    assert again.number == 0 and queued.state.name == "WAITING" and queued.user_attrs["paper"]


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tiny_cifar, tmp_path):
    argv = [sys.executable, str(ROOT / "tune.py"), "--trials", "2", *tiny_flags(tiny_cifar, tmp_path, "--epochs", "1")]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr and "locked" not in stderr
        assert stdout.strip().splitlines()[-1].startswith("python train.py ")
    trials = load(tmp_path).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert sum(bool(t.user_attrs.get("paper")) for t in trials) == 1  # the paper's point queued once
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # each process draws its own points


def test_a_study_of_another_search_or_other_fixed_flags_is_refused(four_trials, tiny_cifar, tmp_path):
    out = tmp_path / "tune"
    shutil.copytree(four_trials[0], out)
    code, _, stderr = run_tune(["--trials", "1", *tiny_flags(tiny_cifar, out, "--epochs", "3")])
    assert code == 2 and stderr.count("\n") == 1
    assert "fixes --epochs 2 (here 3)" in stderr and "another --study" in stderr
    with sqlite3.connect(out / "optuna.db") as db:  # as if an older tune.py had searched other ranges
        db.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'search_space'",
                   (json.dumps(json.dumps({"lr": [0.001, 1.0, "log"]})),))
    code, _, stderr = run_tune(["--trials", "1", *tiny_flags(tiny_cifar, out)])
    assert code == 2 and stderr.count("\n") == 1 and "searched another space" in stderr
    assert len(load(out).trials) == 4  # nothing added


@pytest.mark.parametrize(("extra", "message"), [
    (["--storage", "bogus://nowhere"], "--storage bogus://nowhere: cannot open it"),
    (["--storage", "sqlite:////no/such/folder/x.db"], "cannot open it"),
    (["--storage", "postgresql://me:secret@localhost:1/db"], "postgresql://me:***@localhost:1/db: cannot open it"),
    (["--lr", "0.1"], "--lr is what tune.py searches"),
    (["--nesterov"], "--nesterov is what tune.py searches"),
    (["--val-size", "0"], "would select on the test set"),
    (["--resume", "x/last.pth"], "--resume is not for tune.py"),
    (["--study", "a/b"], "--study 'a/b'"),
])
def test_bad_input_is_one_line(tiny_cifar, tmp_path, extra, message):
    code, stdout, stderr = run_tune(["--trials", "1", *tiny_flags(tiny_cifar, tmp_path), *extra])
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert "secret" not in stderr
    assert "trial 0" not in stdout
