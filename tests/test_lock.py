"""One writer per folder (files/lock.py): real processes on one --out or --out-dir; the lock ends
with its holder, however it ends; torchrun takes it once; a filesystem without flock goes on."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
import train
from conftest import tiny_train_args
from files import lock
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # real training processes, several seconds each


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def held_by(folder: Path, pid: int, timeout: float = 120) -> None:
    """Wait until process `pid` has written itself into the folder's lock file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / lock.LOCK_NAME).read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pytest.fail(f"process {pid} did not take the lock of {folder}")


def refused(result: subprocess.CompletedProcess | tuple[int, str], flag: str, folder: Path, pid: int) -> None:
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {flag} {folder} is in use by process {pid} on {socket.gethostname()}"), err
    assert lines[0].endswith(f"wait for it to end, or choose another {flag}"), err


def holder_process(folder: Path) -> subprocess.Popen:
    """A process that holds `folder` the way every command does, until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from files.lock import hold\n"
            f"with hold({str(folder)!r}, '--out-dir'):\n    print('held', flush=True); time.sleep(600)")
    p = start("-c", code)
    held_by(folder, p.pid)
    return p


def test_a_second_train_on_one_out_is_refused_before_it_reads_data_and_the_first_keeps_its_files(tiny_cifar,
                                                                                                  tmp_path):
    out = tmp_path / "a"
    first = start("train.py", *tiny_train_args(tiny_cifar, out, "--epochs", "6", "--no-reload-best"))
    held_by(out, first.pid)
    # A data folder that does not exist: the refusal comes before any data is read. --overwrite does not
    # take a live run's folder either.
    second = subprocess.run([sys.executable, "train.py", *tiny_train_args(tmp_path / "no-data", out, "--epochs", "1"),
                             "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    refused(second, "--out", out, first.pid)
    assert not (tmp_path / "no-data").exists()
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    last, best = load_checkpoint(out / train.LAST_NAME), load_checkpoint(out / train.BEST_NAME)
    run_id = last["progress"]["run_id"]
    assert best["run_id"] == run_id and f"run {run_id}" in stdout
    history = json.loads((out / train.HISTORY_NAME).read_text())
    assert [row["epoch"] for row in history] == list(range(1, 7)) == [row["epoch"] for row in best["history"]]
    assert not (out / lock.LOCK_NAME).exists()  # removed by its holder at the end


def test_a_live_run_is_not_resumed_and_one_killed_with_sigkill_is(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    first = start("train.py", *tiny_train_args(tiny_cifar, out, "--epochs", "200"))
    held_by(out, first.pid)
    deadline = time.monotonic() + 120
    while not (out / train.LAST_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "train.py", "--resume", str(out / train.LAST_NAME)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    refused(second, "--out", out, first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (out / lock.LOCK_NAME).exists()  # left behind by the killed holder: a file, no longer a lock
    done = load_checkpoint(out / train.LAST_NAME)["epoch"]
    assert train.main(["--resume", str(out / train.LAST_NAME), "--epochs", str(done + 1)]) == 0
    assert load_checkpoint(out / train.LAST_NAME)["epoch"] == done + 1


def test_evaluate_out_dir_has_one_writer_and_its_lock_ends_with_a_killed_holder(trained_run, tiny_cifar, tmp_path,
                                                                               capsys):
    folder = tmp_path / "eval"
    holder = holder_process(folder)
    args = [str(trained_run / train.BEST_NAME), "--data-dir", str(tiny_cifar), "--out-dir", str(folder),
            "--device", "cpu"]
    code = evaluate.main(args)
    refused((code, capsys.readouterr().err), "--out-dir", folder, holder.pid)
    assert sorted(p.name for p in folder.iterdir()) == [lock.LOCK_NAME]  # nothing written beside the holder
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert evaluate.main(args) == 0
    assert (folder / "report.json").is_file() and not (folder / lock.LOCK_NAME).exists()


def test_torchrun_holds_the_lock_once_and_a_refusal_ends_every_rank(tiny_cifar, tmp_path, capsys):
    def torchrun(out: Path, *extra: str) -> subprocess.Popen:
        return start("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--device",
                     "cpu", "--data-dir", str(tiny_cifar), "--out", str(out), "--val-size", "20", "--no-amp", *extra)

    out = tmp_path / "ddp"
    run = torchrun(out, "--epochs", "20")
    # Both ranks would take the lock if each tried, and the second would be refused: the run ends 0
    # only if one did. That one is a rank (a child of torchrun), not torchrun itself.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / lock.LOCK_NAME).is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    holder = json.loads((out / lock.LOCK_NAME).read_text())
    assert holder["pid"] != run.pid and "train.py" in holder["command"]
    code = train.main(tiny_train_args(tiny_cifar, out, "--epochs", "1"))
    refused((code, capsys.readouterr().err), "--out", out, holder["pid"])
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-2000:]
    assert stdout.count("done:") == 1

    busy = tmp_path / "busy"
    keeper = holder_process(busy)
    try:
        refused_run = torchrun(busy, "--epochs", "1")
        _, stderr = refused_run.communicate(timeout=180)
    finally:
        keeper.kill()
    assert refused_run.returncode != 0
    assert stderr.count(f"error: --out {busy} is in use by process {keeper.pid}") == 1  # rank 0 says it, once
    assert "Traceback" not in stderr.split("error: --out")[0]  # neither rank fell over before it


def test_a_filesystem_without_flock_goes_on_without_the_lock(tiny_cifar, tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "nfs"
    assert train.main(tiny_train_args(tiny_cifar, out, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert f"note: {out}: this filesystem cannot lock files" in err and err.count("\n") == 1
    assert (out / train.BEST_NAME).is_file() and not (out / lock.LOCK_NAME).exists()


def test_a_lock_file_removed_under_a_waiting_process_is_not_shared(tmp_path):
    """The holder removes the lock file as it ends; a process that had opened the old file must not
    think it holds the folder while a third locks the new file."""
    folder = tmp_path / "f"
    with lock.hold(folder, "--out"):
        fd = os.open(folder / lock.LOCK_NAME, os.O_RDWR)  # a second opener of the same file, before the removal
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file: its lock is free, and worthless
        with lock.hold(folder, "--out") as held:  # a new file: the folder is held by this holder alone
            assert held and (folder / lock.LOCK_NAME).exists()
            with pytest.raises(lock.FolderInUse), lock.hold(folder, "--out"):
                pass
    finally:
        os.close(fd)
