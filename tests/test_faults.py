"""Faults and bad input: nothing is lost, and nothing runs that shouldn't (docs/reliability.md).

Crash safety (SIGKILL mid-epoch and half-way through each checkpoint write, SIGTERM, SIGINT), output
folders, flags, damaged data sets, fuzzed checkpoints, --deterministic, and evaluate.py's memory.

Where the process boundary is the point (a kill, an exit code, what reaches stderr, a hang) a run is
its own process: forked from this one, it runs `train.py` / `evaluate.py` as `__main__` with its own
pid, exit code, stdout, stderr and signals, without paying ~6 s to import torch again; one run starts
a fresh interpreter, so that start-up is covered too. The fuzz cases call `main()` in-process (half
of them in a forked copy of this process, to use both cores). The whole file takes well under a
minute on 2 CPU cores.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import itertools
import json
import multiprocessing
import os
import pickle
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from conftest import ROOT, dump_py2, rows, save_breaking_on, tiny_train_args
from reports import plots
from training import checkpoint
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import parse_args, resumed_config

BEST, LAST = train.BEST_NAME, train.LAST_NAME


# ----------------------------------------------------------------------------- running the CLIs

def _rss_kb(field: str) -> int:
    """This process's resident memory (VmRSS) or its peak (VmHWM) in KiB; reading VmRSS first
    resets the peak to it where Linux allows (/proc/self/clear_refs), so peaks are per run."""
    if field == "VmRSS":
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _fork(target: Callable[[], None], logs: Path):
    """Run target() in a process forked from this one, with stdout and stderr in `logs`; it also
    writes there how far its peak resident memory rose above where it started."""
    def child() -> None:
        torch.set_num_threads(1)  # as in DataLoader workers: OpenMP's pool does not survive a fork
        logs.mkdir(parents=True, exist_ok=True)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        # line-buffered, as with PYTHONUNBUFFERED: what was printed before a SIGKILL is in the log
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # noqa: SIM115
        start_kb = _rss_kb("VmRSS")
        try:
            target()
        finally:
            (logs / "peak_growth_kb").write_text(str(_rss_kb("VmHWM") - start_kb))
    process = multiprocessing.get_context("fork").Process(target=child)
    with warnings.catch_warnings():  # Python 3.12+ warns on any fork with threads; torch's idle pool is safe
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        process.start()
    return process


def _start(script: str, args: list[str], logs: Path, hook: Callable[[], None] | None = None):
    """`python <script> <args>` as a forked process (see `_fork`), after `hook()` if given."""
    def run() -> None:
        if hook:
            hook()
        sys.argv = [script, *args]
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return _fork(run, logs)


def _finish(process, logs: Path, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a forked process (a hang fails the test); its exit code, stdout and stderr."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"hung for {timeout} s: {(logs / 'stderr').read_text()[-2000:]}")
    return process.exitcode, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def _cli(script: str, args: list[str], logs: Path, hook: Callable[[], None] | None = None) -> tuple[int, str, str]:
    return _finish(_start(script, args, logs, hook), logs)


def _one_clear_line(code: int, err: str, *needles: str, expect: int = 2) -> None:
    """A failure a person can act on: the expected non-zero exit code and exactly one stderr line."""
    assert code == expect and err.count("\n") == 1 and err.endswith("\n"), (code, err)
    assert "Traceback" not in err and all(n in err for n in needles), err


def _wait_for(path: Path, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.is_alive(), f"exited with {process.exitcode} before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreter(tiny_cifar, tmp_path_factory):
    """`python train.py` on an absent device, in a new interpreter (start-up included; train.py
    imports evaluate.py too). Started with the first test of this file, so that its ~6 s of imports
    overlap the tests before `test_a_fresh_interpreter_fails_in_one_line` reads its result."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    run = subprocess.Popen([sys.executable, "train.py", *tiny_train_args(tiny_cifar, out), "--device", device],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield run, device, out
    run.kill()
    run.communicate()


# ----------------------------------------------------------------------------- crash safety

def _stall_in_write(name: str, ready: Path) -> Callable[[], None]:
    """A hook: the first checkpoint write to `name` writes half its temporary file, then hangs."""
    def hang() -> None:
        ready.touch()
        time.sleep(600)

    def install() -> None:
        torch.save = save_breaking_on(name, hang)
    return install


def _pause_in_step(n: int, ready: Path, seconds: float) -> Callable[[], None]:
    """A hook: the n-th training step of the process pauses for `seconds` inside its forward pass."""
    def install() -> None:
        real_loss, calls = torch.nn.functional.cross_entropy, itertools.count(1)

        def cross_entropy(*args, **kwargs):
            if torch.is_grad_enabled() and next(calls) == n:  # evaluation runs without gradients
                ready.touch()
                time.sleep(seconds)
            return real_loss(*args, **kwargs)
        torch.nn.functional.cross_entropy = cross_entropy
    return install


def _interrupt(args: list[str], logs: Path, hook_for: Callable[[Path], Callable[[], None]],
               *signals: int) -> tuple[int, str, str]:
    """Start a run, send it `signals` once the hook says it has reached its point, let it end."""
    ready = logs / "ready"
    process = _start("train.py", args, logs, hook_for(ready))
    _wait_for(ready, process)
    for signum in signals:
        os.kill(process.pid, signum)
        time.sleep(0.2)
    return _finish(process, logs)


def _checkpoints_on_disk(out: Path) -> dict[str, dict]:
    """Every *.pth in `out`, loaded: a half-written file under a real name fails here."""
    return {p.name: load_checkpoint(p) for p in sorted(out.glob("*.pth"))}


def _half_written(out: Path, name: str) -> list[Path]:
    """The temporary files a killed write of `name` left behind; they must not load."""
    left = sorted(out.glob(f".{name}.*.tmp"))
    for path in left:
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(path)
    return left


@pytest.mark.slow
def test_kills_lose_nothing_and_resume_finishes_the_run(tiny_cifar, tmp_path):
    """SIGKILL half-way through writing the best checkpoint, then last.pth, then in the middle of an
    epoch: each time every checkpoint on disk loads, and --resume carries on (removing, with a note,
    the temporary file the killed write left, which would hold its space); the last one finishes."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    fresh = tiny_train_args(tiny_cifar, out, "--epochs", "3", "--subset", "24", "--batch-size", "8")
    resume = ["--resume", str(out / LAST)]

    code, _, _ = _interrupt(fresh, logs / "1", lambda ready: _stall_in_write(BEST, ready), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert list(_checkpoints_on_disk(out)) == [LAST] and _half_written(out, BEST)  # last.pth is written first
    assert load_checkpoint(out / LAST)["epoch"] == 1

    left = _half_written(out, BEST)
    code, out_text, _ = _interrupt(resume, logs / "2", lambda ready: _stall_in_write(LAST, ready), signal.SIGKILL)
    assert code == -signal.SIGKILL and f"note: {out / BEST} was not written when the run stopped" in out_text
    assert f"note: removed {left[0]}, left by a write that was killed before it ended" in out_text
    assert not list(out.glob(f".{BEST}.*.tmp"))
    on_disk = _checkpoints_on_disk(out)
    assert on_disk[BEST]["epoch"] == on_disk[LAST]["epoch"] == 1 and _half_written(out, LAST)

    code, _, _ = _interrupt(resume, logs / "3", lambda ready: _pause_in_step(2, ready, 600), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert {k: v["epoch"] for k, v in _checkpoints_on_disk(out).items()} == {BEST: 1, LAST: 1}

    code, out_text, err = _cli("train.py", resume, logs / "4")
    assert (code, err) == (0, "") and "done: 3 epochs" in out_text
    on_disk = _checkpoints_on_disk(out)
    assert on_disk[LAST]["epoch"] == 3 and [h["epoch"] for h in on_disk[LAST]["progress"]["history"]] == [1, 2, 3]
    assert on_disk[BEST]["run_id"] == on_disk[LAST]["progress"]["run_id"]
    assert json.loads((out / train.HISTORY_NAME).read_text()) == on_disk[LAST]["progress"]["history"]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_last_pth_and_exit_with_a_clear_message(tiny_cifar, tmp_path, signum):
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = tiny_train_args(tiny_cifar, out, "--epochs", "2", "--subset", "24", "--batch-size", "8")
    code, out_text, err = _interrupt(args, logs, lambda ready: _pause_in_step(2, ready, 0.5), signum)
    assert (code, err) == (128 + signum, "")
    assert (f"stopped by signal {signum} in epoch 1 at step 2/3; saved {out / LAST}; "
            f"continue with: python train.py --resume {out / LAST}") in out_text
    saved = load_checkpoint(out / LAST)["progress"]
    assert (saved["epoch"], saved["step"]) == (0, 2) and saved["partial"][2] == 16  # 2 steps of 8 images


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tiny_cifar, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = tiny_train_args(tiny_cifar, out, "--epochs", "2", "--subset", "24", "--batch-size", "8")
    code, _, err = _interrupt(args, logs, lambda ready: _pause_in_step(5, ready, 600), signal.SIGINT, signal.SIGINT)
    _one_clear_line(code, err, "interrupted twice: stopped at once; the last checkpoint written stays", expect=130)
    assert set(_checkpoints_on_disk(out)) == {BEST, LAST} and load_checkpoint(out / LAST)["epoch"] == 1


# ----------------------------------------------------------------------------- checkpoints: fuzzing

class _Payload:
    """Unpickling this runs a shell command that creates `marker`; a safe loader never does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_ODD_VALUES = (None, -1, 0, 2**40, -(2**63), 1.5, float("nan"), float("inf"), True, "x", b"x", [], {}, [1, "a"],
               {"a": 1}, torch.zeros(0), torch.zeros(3), torch.tensor(float("nan")))


def _leaves(obj, path=()) -> Iterator[tuple]:
    """Paths to every value inside nested dicts and lists."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield (*path, key)
        yield from _leaves(value, (*path, key))


def _replaced(obj, path: tuple, value):
    """A copy of `obj` with the value at `path` replaced (or deleted, for the marker `_leaves`)."""
    head = copy.copy(obj)
    if len(path) > 1:
        head[path[0]] = _replaced(obj[path[0]], path[1:], value)
    elif value is _leaves:
        del head[path[0]]
    else:
        head[path[0]] = value
    return head


def _with_entry(data: bytes, suffix: str, content: bytes | None) -> bytes:
    """The zip with its entry ending in `suffix` replaced by `content` (removed for None)."""
    source, buffer = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for info in source.infolist():
            if not info.filename.endswith(suffix):
                out.writestr(info.filename, source.read(info.filename))
            elif content is not None:
                out.writestr(info.filename, content)
    return buffer.getvalue()


def _flip_spans(data: bytes) -> list[tuple[int, int]]:
    """Where bit flips go: mostly the pickle and the zip's headers (a flip in raw tensor bytes is
    caught by the checkpoint's SHA-256, tested in test_integrity.py, so the whole file is one span
    among many)."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    spans = [(i.header_offset, i.header_offset + 64 + (i.file_size if i.filename.endswith("data.pkl") else 0))
             for i in archive.infolist() if not re.search(r"/data/\d+$", i.filename)]
    return [*spans, (archive.start_dir, len(data)), (0, len(data))]


def _mutants(data: bytes, n: int, seed: int, marker: Path, path: Path) -> Iterator[str]:
    """Write `n` damaged copies of a checkpoint file to `path`, one after the other; yield what was done.
    Bit flips are patched into a pristine copy and patched back, to spare writing 40 MB each time."""
    rng, ckpt = random.Random(seed), torch.load(io.BytesIO(data), weights_only=True)
    leaves, spans, pristine = list(_leaves(ckpt)), _flip_spans(data), False
    for _ in range(n):
        kind = rng.choices(["flip", "truncate", "entry", "value", "payload"], [8, 3, 3, 5, 1])[0]
        if kind in ("flip", "truncate") and not pristine:
            path.write_bytes(data)
        pristine = kind == "flip"
        if kind == "flip":
            flips = [(rng.randrange(*rng.choice(spans)), 1 << rng.randrange(8)) for _ in range(rng.randint(1, 4))]
            patched = {}
            for at, bit in flips:
                patched[at] = patched.get(at, data[at]) ^ bit
            _patch(path, patched)
            yield f"flip {flips}"
            _patch(path, {at: data[at] for at in patched})
        elif kind == "truncate":
            cut = rng.randrange(len(data))
            os.truncate(path, cut)
            yield f"truncate at {cut}"
        elif kind == "entry":
            suffix = rng.choice(["data.pkl", "byteorder", "version", "/data/0", "/data/5", ".storage_alignment"])
            content = rng.choice([None, b"", b"garbage", b"big", b"99\n", pickle.dumps([1, 2]),
                                  pickle.dumps({"model": 5}), pickle.dumps(_Payload(marker), protocol=2)])
            path.write_bytes(_with_entry(data, suffix, content))
            yield f"entry {suffix} -> {content!r:.30}"
        else:
            where = rng.choice(leaves)
            value = _Payload(marker) if kind == "payload" else rng.choice([*_ODD_VALUES, _leaves])
            torch.save(_replaced(ckpt, where, value), path)
            yield f"{'/'.join(map(str, where))} -> {'deleted' if value is _leaves else repr(value)[:30]}"


def _patch(path: Path, new_bytes: dict[int, int]) -> None:
    with open(path, "r+b") as f:
        for at, value in new_bytes.items():
            f.seek(at)
            f.write(bytes([value]))


@pytest.fixture
def no_global_state_change():
    """--deterministic is process-wide: turn it off after a test that may have turned it on."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def fuzzing():
    """One thread (many small model builds go faster so on 2 busy cores), and --deterministic turned
    off afterwards: a damaged config may turn it on in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def _on_both_cores(work: Callable[[int], int], logs: Path) -> int:
    """work(0) here and work(1) in a forked copy of this process, side by side; their results summed."""
    child = _fork(lambda: (logs / "result").write_text(str(work(1))), logs)
    here = work(0)
    code, _, err = _finish(child, logs)
    assert code == 0, err
    return here + int((logs / "result").read_text())


_NO_DIGEST_NOTE = re.compile(r"note: \S+ records no SHA-256 of its tensors [^\n]*\n")


def _quietly(main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str]:
    """An in-process CLI call: its exit code and its stderr (anything it raises fails the test), less
    the note that a mutant whose digest was deleted loads unchecked (an old checkpoint's, by design)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, _NO_DIGEST_NOTE.sub("", err.getvalue())


def test_fuzzed_best_checkpoints_load_or_fail_clearly_in_evaluate(trained_run, tmp_path, fuzzing):
    """evaluate.py on 120 damaged copies of a best checkpoint. It is asked to classify an image
    file that does not exist, so a copy that loads (model rebuilt from it) ends there."""
    marker, absent, data = tmp_path / "code_ran", tmp_path / "absent.png", (trained_run / BEST).read_bytes()

    def work(part: int) -> int:
        loaded, path = 0, tmp_path / f"mutant{part}.pth"
        for what in _mutants(data, 60, 10 + part, marker, path):
            code, err = _quietly(evaluate.main, [str(path), "--image", str(absent), "--device", "cpu"])
            if code == 1:  # the checkpoint loaded and the model was rebuilt from it
                assert err == f"error: {absent}: cannot classify it: no such file\n", (what, err)
            else:
                _one_clear_line(code, err, f"error: {path}: ")
            loaded += code == 1
        return loaded
    loaded = _on_both_cores(work, tmp_path / "child")
    assert 10 < loaded < 110 and not marker.exists()  # both outcomes reached; no payload ran


@pytest.mark.slow
def test_fuzzed_last_checkpoints_load_or_fail_clearly_in_resume(trained_run, tmp_path, fuzzing):
    """train.py --resume on 120 damaged copies of a last.pth. Its --out cannot be made, so a copy
    that loads (config, model, optimizer, RNG states and progress restored) stops right after."""
    marker, blocked, data = tmp_path / "code_ran", tmp_path / "a_file", (trained_run / LAST).read_bytes()
    blocked.write_text("a file: no folder can be made below it")

    def work(part: int) -> int:
        loaded, path = 0, tmp_path / f"mutant{part}.pth"
        for what in _mutants(data, 60, 20 + part, marker, path):
            code, err = _quietly(train.main, ["--resume", str(path), "--out", str(blocked / "out"), "--device", "cpu"])
            _one_clear_line(code, err)
            assert "cannot write to --out" in err or err.startswith(f"error: {path}: "), (what, err)
            loaded += "cannot write to --out" in err
        return loaded
    loaded = _on_both_cores(work, tmp_path / "child")
    assert 10 < loaded < 110 and not marker.exists()


def _rng_python_state_set(ckpt: dict, value) -> dict:
    internal = list(ckpt["rng"]["python"][1])
    internal[5] = value
    return {**ckpt, "rng": {**ckpt["rng"], "python": [3, internal, None]}}


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "config": {**c["config"], "epochs": "3"}}, "its config holds values no flag accepts (epochs='3')"),
    (lambda c: {**c, "config": {**c["config"], "lr": float("nan")}}, "no flag accepts (lr=nan)"),
    (lambda c: {**c, "config": {**c["config"], "batch_size": 0}}, "no flag accepts (batch_size=0)"),
    (lambda c: {**c, "config": {**c["config"], 5: "x"}}, "its config has fields this version does not know: 5"),
    (lambda c: {**c, "progress": {**c["progress"], "history": [{"epoch": 1}]}}, "progress record is malformed"),
    (lambda c: _rng_python_state_set(c, -1), "cannot resume from it (OverflowError"),
], ids=["epochs_text", "lr_nan", "batch_size_0", "int_key", "history_row", "rng_negative"])
def test_resume_refuses_values_that_would_break_the_run_later(trained_run, tmp_path, capsys, change, message):
    """Damage that loads but would stop a resumed run later (in training, or in the last plot) with a
    traceback is refused up front, naming the file (the fuzzing above found the RNG case)."""
    path, blocked = tmp_path / LAST, tmp_path / "a_file"
    blocked.write_text("a file: no folder can be made below it")
    torch.save(change(load_checkpoint(trained_run / LAST)), path)
    code = train.main(["--resume", str(path), "--out", str(blocked / "out"), "--device", "cpu"])
    _one_clear_line(code, capsys.readouterr().err, f"error: {path}: ", message)


def test_fuzzed_checkpoints_as_processes_end_in_time_without_a_traceback(trained_run, tmp_path):
    """A handful of the damaged copies again, each through the CLI in a process of its own with a
    time limit: no hang, no traceback, one line on stderr."""
    marker, blocked, started = tmp_path / "code_ran", tmp_path / "a_file", []
    blocked.write_text("a file: no folder can be made below it")
    for name, script, seed in ((BEST, "evaluate.py", 3), (LAST, "train.py", 4)):
        for i, _ in enumerate(_mutants((trained_run / name).read_bytes(), 3, seed, marker, tmp_path / "mutant.pth")):
            path = tmp_path / f"{script}{i}.pth"
            shutil.copyfile(tmp_path / "mutant.pth", path)
            args = ([str(path), "--image", str(tmp_path / "absent.png"), "--device", "cpu"] if script == "evaluate.py"
                    else ["--resume", str(path), "--out", str(blocked / "out"), "--device", "cpu"])
            started.append((path, tmp_path / f"log_{script}{i}", _start(script, args, tmp_path / f"log_{script}{i}")))
    payload, logs = tmp_path / "payload.pth", tmp_path / "log_payload"
    torch.save({**load_checkpoint(trained_run / BEST), "config": _Payload(marker)}, payload)
    started.append((payload, logs, _start("evaluate.py", [str(payload), "--data-dir", str(tmp_path)], logs)))
    for path, logs, process in started:
        code, _, err = _finish(process, logs, timeout=60)
        err = _NO_DIGEST_NOTE.sub("", err)
        _one_clear_line(code, err, expect=code)
        assert code in (1, 2) and (str(path) in err or "absent.png" in err or "--out" in err), err
    assert not marker.exists()


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs: '-1' is not a positive integer"),
    (["--batch-size", "-8"], "--batch-size: '-8' is not a positive integer"),
    (["--workers", "-1"], "--workers: '-1' is not 'auto' or an integer >= 0"),  # -1 used to pass as `auto`
    (["--lr", "nan"], "--lr: 'nan' is not a positive finite number"),
    (["--lr", "-0.001"], "--lr: '-0.001' is not a positive finite number"),
    (["--lr", "inf"], "--lr: 'inf' is not a positive finite number"),
    (["--device", "cuda:x"], "--device: 'cuda:x' is not auto, cpu, cuda, cuda:N or mps"),
    (["--num-classes", "5"], "--num-classes: '5' is not an integer in 10..100000"),  # labels go up to 9
    (["--seed", str(2**70)], "--seed: '1180591620717411303424' is not an integer between"),
])
def test_bad_flags_get_one_line_and_exit_code_2(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(flags)
    _one_clear_line(stop.value.code, capsys.readouterr().err, f"error: argument {message}", "(see ")


def test_zero_workers_is_valid_it_loads_in_the_main_process():
    assert parse_args(["--workers", "0"])[0] == {"workers": 0} and parse_args(["--workers", "auto"])[0]["workers"] == -1


@pytest.mark.parametrize("device", [
    pytest.param("cuda:7", marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="has 8 GPUs")),
    pytest.param("mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS")),
])
def test_absent_device_is_one_clear_error(tiny_cifar, tmp_path, capsys, device):
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "out") + ["--device", device])
    _one_clear_line(code, capsys.readouterr().err, f"error: --device {device}: ")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- output folders

@pytest.mark.parametrize("where", ["below_a_file", "is_a_file"])
def test_unwritable_out_fails_before_anything_is_read_or_trained(tiny_cifar, tmp_path, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "below_a_file" else blocker
    code = train.main(tiny_train_args(tiny_cifar, out))
    captured = capsys.readouterr()
    _one_clear_line(code, captured.err, f"error: cannot write to --out {out}: ", "pick a writable folder")
    assert captured.out == "" and blocker.read_text() == "not a folder"  # no data read, no epoch started


def test_resuming_into_another_runs_folder_changes_nothing(trained_run, tmp_path, capsys):
    """A run resumed with --out pointing at another run's checkpoints is refused before it starts."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / BEST).write_bytes((trained_run / BEST).read_bytes())
    mine = load_checkpoint(trained_run / LAST)
    mine["progress"]["run_id"] = "another0run0"
    torch.save(mine, tmp_path / LAST)
    before = sorted((p.name, p.read_bytes()) for p in theirs.iterdir())
    code = train.main(["--resume", str(tmp_path / LAST), "--out", str(theirs), "--epochs", "3"])
    _one_clear_line(code, capsys.readouterr().err, f"{theirs / BEST} belongs to another run", "--overwrite")
    assert sorted((p.name, p.read_bytes()) for p in theirs.iterdir()) == before


# ----------------------------------------------------------------------------- damaged data sets

def _payload_pickle(marker: Path, how: str) -> bytes:
    """A batch file whose unpickling would create `marker`: through `os.system`, or through `eval`."""
    class Evil:
        def __reduce__(self):
            if how == "os":
                return (os.system, (f"touch {marker}",))
            return (eval, (f"open({str(marker)!r}, 'w').close()",))
    return pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": Evil()}, protocol=2)


def _damage(folder: Path, case: str, marker: Path) -> str:
    """Damage one file of a tiny CIFAR-10 folder as `case` says; the name of the damaged file."""
    batches = folder / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    if case == "truncated":
        data = (batches / "test_batch").read_bytes()
        (batches / "test_batch").write_bytes(data[: len(data) // 2])
    elif case == "wrong_shape":
        dump_py2({"data": rng.integers(0, 255, (50, 1024), dtype=np.uint8), "labels": [0] * 50}, batches / "test_batch")
    elif case == "labels_out_of_range":
        dump_py2({"data": rows(rng.integers(0, 255, (50, 32, 32, 3), dtype=np.uint8)), "labels": [3] * 49 + [10]},
                 batches / "test_batch")
    elif case == "missing_meta":
        (batches / "batches.meta").unlink()
        return "batches.meta"
    elif case == "imports_os":
        (batches / "test_batch").write_bytes(_payload_pickle(marker, "os"))
    elif case == "calls_eval":
        (batches / "batches.meta").write_bytes(_payload_pickle(marker, "eval"))
        return "batches.meta"
    return "test_batch"


DATA_DAMAGE = {
    "truncated": "truncated or unreadable", "wrong_shape": "must be a uint8 array of shape (N, 3072)",
    "labels_out_of_range": "labels out of range: expected 0..9, got 3..10", "missing_meta": "file not found",
    "imports_os": "system, which a CIFAR-10 file never holds); nothing in it was run",
    "calls_eval": "eval, which a CIFAR-10 file never holds); nothing in it was run",
}


@pytest.mark.parametrize("case", DATA_DAMAGE)
def test_damaged_data_is_one_clear_error_in_both_clis(trained_run, tiny_copy, tmp_path, case):
    """train.py and evaluate.py, each a process of its own, on a data folder with one damaged file."""
    marker = tmp_path / "code_ran"
    name = _damage(tiny_copy, case, marker)
    runs = {"train.py": tiny_train_args(tiny_copy, tmp_path / "out"),
            "evaluate.py": [str(trained_run / BEST), "--data-dir", str(tiny_copy), "--out-dir", str(tmp_path / "eval"),
                            "--no-robustness", "--device", "cpu"]}
    started = {script: _start(script, args, tmp_path / script) for script, args in runs.items()}
    for script, process in started.items():
        code, _, err = _finish(process, tmp_path / script)
        _one_clear_line(code, err, f"error: {tiny_copy / 'cifar-10-batches-py' / name}", DATA_DAMAGE[case])
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.pth"))


# ----------------------------------------------------------------------------- --deterministic

def _tensors(obj, path=()) -> dict[tuple, torch.Tensor]:
    """Every tensor inside nested dicts and lists, by its path."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return {k: v for key, value in items for k, v in _tensors(value, (*path, key)).items()}


def _record_determinism(path: Path) -> Callable[[], None]:
    """A hook: the first training step writes whether deterministic algorithms are on."""
    def install() -> None:
        real_loss = torch.nn.functional.cross_entropy

        def cross_entropy(*args, **kwargs):
            if torch.is_grad_enabled() and not path.exists():
                path.write_text(str(torch.are_deterministic_algorithms_enabled()))
            return real_loss(*args, **kwargs)
        torch.nn.functional.cross_entropy = cross_entropy
    return install


def test_deterministic_cpu_runs_are_bitwise_identical(tiny_cifar, tmp_path):
    """Two --deterministic runs with one seed end with every tensor of last.pth equal (weights,
    momentum, RNG states); so does a run without the flag, which is why a resume may change it."""
    assert not torch.are_deterministic_algorithms_enabled()  # importing train.py turned nothing on
    started = {}
    for name, flag in (("a", "--deterministic"), ("b", "--deterministic"), ("plain", "--no-deterministic")):
        args = tiny_train_args(tiny_cifar, tmp_path / name, "--epochs", "1", "--subset", "16", "--batch-size", "8")
        started[name] = _start("train.py", [*args, flag], tmp_path / f"log_{name}",
                               _record_determinism(tmp_path / f"log_{name}" / "on"))
    runs = {}
    for name, process in started.items():
        assert _finish(process, tmp_path / f"log_{name}")[0] == 0
        runs[name] = _tensors(load_checkpoint(tmp_path / name / LAST))
    assert [(tmp_path / f"log_{name}" / "on").read_text() for name in started] == ["True", "True", "False"]
    a, b, plain = runs["a"], runs["b"], runs["plain"]
    assert len(a) > 100 and a.keys() == b.keys() == plain.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], plain[k]) for k in a)
    saved = load_checkpoint(tmp_path / "a" / LAST)["config"]
    assert saved["deterministic"] is True
    assert resumed_config({"deterministic": False}, saved, "last.pth").deterministic is False


def test_an_op_without_a_deterministic_kernel_is_one_clear_error(tiny_cifar, tmp_path, monkeypatch, capsys,
                                                                 no_global_state_change):
    def cuda_only_failure(*args, **kwargs):  # what torch raises, e.g. on CUDA, for such an op
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you "
                           "set 'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
                           "this operation, or you can use the 'warn_only=True' option, if that's acceptable for "
                           "your application.")
    monkeypatch.setattr(train, "train_one_epoch", cuda_only_failure)
    code = train.main(tiny_train_args(tiny_cifar, tmp_path, "--deterministic"))
    _one_clear_line(code, capsys.readouterr().err, "error: --deterministic: adaptive_avg_pool2d_backward_cuda does "
                    "not have a deterministic implementation; run without --deterministic", expect=1)


# ----------------------------------------------------------------------------- evaluate.py's memory

class _TinyNet(torch.nn.Sequential):
    """A stand-in for ResNet9 that classifies 10,000 images in a fraction of a second: the memory
    test is about evaluate.py's handling of the images, not about the model."""

    def __init__(self, num_classes: int = 10) -> None:
        conv = torch.nn.Conv2d(3, 4, 3, stride=4)  # 32 x 32 -> 8 x 8
        super().__init__(conv, torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, num_classes))


def _test_set_folder(root: Path, n: int) -> Path:
    """A CIFAR-10 folder whose test_batch holds `n` random images (the training batches hold 2 each)."""
    rng = np.random.default_rng(n)
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, size in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", n)]:
        dump_py2({"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8),
                  "labels": rng.integers(0, 10, size).tolist()}, batches / name)
    dump_py2({"label_names": list(evaluate.CLASSES)}, batches / "batches.meta")
    return root


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or _glibc_mallopt() is None,
                    reason="peak memory is read from Linux's /proc, allocations pinned with glibc's mallopt")
def test_evaluate_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Beyond the uint8 test images themselves (3,072 bytes each, held a few times over while they are
    read and moved to the device), evaluate.py's peak memory must not grow with their number: less
    than 12,288 bytes an image, the size of one float32 copy of it (6,300 measured: two uint8 copies)."""
    checkpoint.save_checkpoint({"model": _TinyNet().state_dict(), "config": {"arch": "resnet9", "num_classes": 10},
                                "epoch": 1}, tmp_path / "tiny.pth")

    def tiny_model_no_figures() -> None:
        # glibc moves its mmap threshold as blocks are freed, which makes peaks of identical runs differ
        # by 100 MB; a fixed one (M_MMAP_THRESHOLD) hands big blocks back, so the peak follows live memory
        assert _glibc_mallopt()(-3, 64 * 1024) == 1
        checkpoint.build_model = lambda arch, num_classes, *rest: _TinyNet(num_classes)  # any activation, widths
        for name in dir(plots):  # the figures show fixed-size summaries: their memory does not grow
            if name.startswith("save_"):
                setattr(plots, name, lambda *args, **kwargs: Path(os.devnull))

    sizes, started = (1_000, 21_000), {}
    for n in sizes:
        args = [str(tmp_path / "tiny.pth"), "--data-dir", str(_test_set_folder(tmp_path / f"d{n}", n)),
                "--out-dir", str(tmp_path / f"e{n}"), "--no-robustness", "--device", "cpu"]
        started[n] = _start("evaluate.py", args, tmp_path / f"log{n}", tiny_model_no_figures)
    peaks = {}
    for n, process in started.items():
        code, out, err = _finish(process, tmp_path / f"log{n}")
        assert (code, err) == (0, "") and f"{n} test images" in out
        peaks[n] = int((tmp_path / f"log{n}" / "peak_growth_kb").read_text()) * 1024
    per_image = (peaks[sizes[1]] - peaks[sizes[0]]) / (sizes[1] - sizes[0])
    assert per_image < 4 * 3072, f"evaluate.py's peak grows by {per_image:.0f} bytes an image ({peaks})"


# ----------------------------------------------------------------------------- start-up

def test_a_fresh_interpreter_fails_in_one_line(fresh_interpreter):
    run, device, out = fresh_interpreter
    stdout, stderr = run.communicate(timeout=120)
    _one_clear_line(run.returncode, stderr, f"error: --device {device}: ")
    assert stdout == "" and not out.exists()
