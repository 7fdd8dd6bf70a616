"""Data-parallel training under torchrun (gloo on the CPU): equivalence, outputs, resume, failures."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import train
from conftest import remount
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, UsageError, fresh_config
from training.run import build_training
from training.runtime import Distributed

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--val-size", "20", "--no-amp", *extra]  # fp32


@pytest.mark.slow
def test_two_processes_take_the_same_first_step_as_one(tiny_cifar, tmp_path, capsys):
    """Global batch 32 split over 2 processes (16 each, SyncBatchNorm) = one process at batch 32:
    one epoch of 32 images is exactly one optimizer step. The 2-process run writes one set of
    outputs, which a single process evaluates; both runs' last.pth resume under torchrun."""
    flags = ("--epochs", "1", "--subset", "32", "--batch-size", "32", "--sync-bn")
    assert train.main(tiny(tiny_cifar, tmp_path / "one", *flags)) == 0
    two = tmp_path / "two"
    result = torchrun(*tiny(tiny_cifar, two, *flags))
    assert result.returncode == 0, result.stderr[-2000:]
    one_ckpt, two_ckpt = (load_checkpoint(tmp_path / name / train.LAST_NAME) for name in ("one", "two"))
    loss_one, loss_two = (c["progress"]["history"][0]["train_loss"] for c in (one_ckpt, two_ckpt))
    assert abs(loss_one - loss_two) < 1e-5 * loss_one
    initial = build_training(TrainConfig(), torch.device("cpu"), Distributed())[0].state_dict()
    assert not torch.equal(one_ckpt["model"]["conv1.weight"], initial["conv1.weight"])  # the step did move them
    for key, value in one_ckpt["model"].items():
        torch.testing.assert_close(two_ckpt["model"][key], value, rtol=1e-4, atol=1e-4, msg=key)

    assert result.stdout.count("epoch   1/1 |") == 1 and result.stdout.count("done:") == 1  # rank 0 alone prints
    assert "2 process(es)" in result.stdout
    assert sorted(p.name for p in two.iterdir()) == sorted(
        [train.BEST_NAME, train.LAST_NAME, train.HISTORY_NAME, "loss_curve.png", "accuracy_curve.png"])
    assert not any(k.startswith("module.") for k in load_checkpoint(two / train.BEST_NAME)["model"])
    assert evaluate.main([str(two / train.BEST_NAME), "--data-dir", str(tiny_cifar),
                          "--out-dir", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out

    for name in ("two", "one"):  # a DDP last.pth and a single-process one continue under torchrun
        result = torchrun("--resume", str(tmp_path / name / train.LAST_NAME), "--epochs", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "resumed after epoch 1 step 0" in result.stdout and "epoch   2/2 |" in result.stdout
        assert "epoch   1/2 |" not in result.stdout
        history = load_checkpoint(tmp_path / name / train.LAST_NAME)["progress"]["history"]
        assert [h["epoch"] for h in history] == [1, 2]


def test_uneven_global_batch_is_refused(tiny_cifar, tmp_path):
    cfg = fresh_config({"batch_size": 33, "data_dir": str(tiny_cifar), "out": str(tmp_path)})
    with pytest.raises(UsageError, match="--batch-size 33 is the global batch and must divide evenly over 2"):
        train.fit(cfg, dist=Distributed(rank=0, world_size=2), device=torch.device("cpu"))


def _rank_pid(parent: int, rank: int) -> int | None:
    for child in Path(f"/proc/{parent}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
    return None


@pytest.mark.slow
def test_a_hung_process_ends_the_job_with_a_clear_error(tiny_cifar, tmp_path):
    """Freeze rank 1 (SIGSTOP) after the first epoch: rank 0's next collective times out after
    --dist-timeout seconds, and rank 0 exits with one clear line (torchrun then ends the job)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--device", "cpu", *tiny(tiny_cifar, tmp_path, "--epochs", "50"),
           "--dist-timeout", "5"]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
    frozen = None
    try:
        deadline = time.monotonic() + 120
        while "epoch   1/50" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        frozen, rank0 = _rank_pid(job.pid, 1), _rank_pid(job.pid, 0)
        assert frozen and rank0, "ranks not found"
        os.kill(frozen, signal.SIGSTOP)
        start = time.monotonic()
        while Path(f"/proc/{rank0}").exists() and time.monotonic() - start < 60:
            time.sleep(0.5)
        assert time.monotonic() - start < 60, "rank 0 did not give up on the frozen rank"
        assert "error: process 0: lost contact with the other processes" in log.read_text()
    finally:
        if frozen:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(frozen, sig)
        job.kill()
        job.wait()
    assert (tmp_path / train.LAST_NAME).is_file()  # the last epoch's checkpoint stays


@pytest.mark.slow
def test_a_failed_write_on_rank_0_ends_every_process_at_once(tiny_cifar, trained_run, tmp_path, tmpfs):
    """--out on a disk that holds epoch 1's checkpoints but not a second last.pth: rank 0's write at
    the end of epoch 2 fails, every process learns of it there and exits with code 1, and rank 0 alone
    says why, in one line (rank 1 does not go on into epoch 3 to find rank 0 gone: a lost-contact
    error, or a wait of --dist-timeout). The two processes are started as torchrun starts them (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT) but without its agent, which would stop the others itself. A
    resume once there is room finishes the run."""
    last, best = ((trained_run / name).stat().st_size for name in (train.LAST_NAME, train.BEST_NAME))
    out = tmpfs(f"{(2 * last + best // 2) // 1024}k") / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--device", "cpu", *tiny(tiny_cifar, out, "--epochs", "3"),
           "--dist-timeout", "120"]
    start = time.monotonic()
    ranks = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        results = [(p.wait(timeout=110), *p.communicate()) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert time.monotonic() - start < 110
    (code0, out0, err0), (code1, out1, err1) = results
    assert (code0, code1) == (1, 1), (err0[-2000:], err1[-2000:])
    assert err0.count("\n") == 1 and "Traceback" not in err0, err0
    assert err0.startswith(f"error: cannot write the checkpoint {out / train.LAST_NAME}: no space left on its disk")
    assert (out1, err1) == ("", "")  # rank 0 alone prints
    assert "epoch   1/3 |" in out0 and load_checkpoint(out / train.LAST_NAME)["epoch"] == 1
    assert load_checkpoint(out / train.BEST_NAME)["epoch"] == 1 and not list(out.glob(".*.tmp"))
    remount(out.parent, f"size={4 * last // 1024}k")
    assert train.main(["--resume", str(out / train.LAST_NAME)]) == 0
    assert load_checkpoint(out / train.LAST_NAME)["epoch"] == 3
