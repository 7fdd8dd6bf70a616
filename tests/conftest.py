"""Shared fixtures: a tiny CIFAR-10 folder in the official layout, and the proxy folder if present;
small disks of their own (tmpfs) for the write-fault tests; and the helpers that stop a run
mid-epoch and compare two runs bit for bit (exact-resume tests).

The tiny folder is synthetic: each class has its own colour and stripe pattern plus noise, so a
model can learn it in a few steps. Its pickles are written as the official Python 2 files are
(byte strings), so the reader is tested on that encoding. Tests on real images use the folder
named by CIFAR10_DIR and skip when it is unset.
"""
from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import CLASSES  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402

TINY_TRAIN_PER_CLASS = 14  # 140 training images: 2 steps of 64 plus a partial one
TINY_TEST_PER_CLASS = 5


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, the way the official batch files hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # as the official files: numpy's rebuilder under its pre-2.0 module path
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 32 x 32 x 3 uint8: a per-class colour and stripe frequency, plus noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    colours = np.array([[(c * 53) % 256, (c * 97 + 60) % 256, (c * 151 + 120) % 256] for c in range(10)])
    images = np.empty((n, 32, 32, 3), dtype=np.float64)
    for i, c in enumerate(labels):
        stripes = 0.5 + 0.5 * np.sin((xx + yy * (c % 3)) * (c + 1) * np.pi / 16)
        images[i] = colours[c] * (0.4 + 0.6 * stripes[..., None])
    images += rng.normal(0, 20, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official channel-planar rows of 3072 bytes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar_folder(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), train_per_class))
    test_labels = rng.permutation(np.repeat(np.arange(10), test_per_class))
    train_images = synthetic_images(train_labels, rng)
    bounds = np.linspace(0, len(train_labels), 6).astype(int)
    for i in range(5):
        a, b = bounds[i], bounds[i + 1]
        dump_py2({"batch_label": f"training batch {i + 1} of 5", "labels": train_labels[a:b].tolist(),
                  "data": rows(train_images[a:b]), "filenames": [f"img_{j}.png" for j in range(a, b)]},
                 folder / f"data_batch_{i + 1}")
    dump_py2({"batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(),
              "data": rows(synthetic_images(test_labels, rng)),
              "filenames": [f"test_{j}.png" for j in range(len(test_labels))]}, folder / "test_batch")
    dump_py2({"num_cases_per_batch": int(bounds[1]), "label_names": list(CLASSES), "num_vis": 3072},
             folder / "batches.meta")
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A read-only tiny CIFAR-10 folder (140 train, 50 test images); copy it before damaging it."""
    return write_cifar_folder(tmp_path_factory.mktemp("tiny"), TINY_TRAIN_PER_CLASS, TINY_TEST_PER_CLASS)


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A fresh tiny folder a test may damage."""
    return write_cifar_folder(tmp_path / "data", TINY_TRAIN_PER_CLASS, TINY_TEST_PER_CLASS)


@pytest.fixture(scope="session")
def proxy_dir() -> Path:
    """The real-image folder named by CIFAR10_DIR (see README, Tests); skips when unset."""
    value = os.environ.get("CIFAR10_DIR")
    if not value:
        pytest.skip("CIFAR10_DIR is not set: no real CIFAR-10 images for this test")
    if not (Path(value) / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.fail(f"CIFAR10_DIR={value} holds no cifar-10-batches-py/data_batch_1")
    return Path(value)


def tiny_train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """train.py flags for a fast run on the tiny folder: 2 epochs, 20 held-out images, no workers,
    fp32 (bit-level checks hold on every CPU; bf16 has its own tests)."""
    return ["--data-dir", str(data_dir), "--out", str(out), "--epochs", "2", "--val-size", "20",
            "--workers", "0", "--device", "cpu", "--no-amp", *extra]


@pytest.fixture(scope="session")
def trained_run(tiny_cifar, tmp_path_factory) -> Path:
    """The output folder of one 2-epoch training on the tiny folder, shared by read-only tests."""
    import train
    out = tmp_path_factory.mktemp("run")
    assert train.main(tiny_train_args(tiny_cifar, out, "--no-reload-best")) == 0
    return out


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        raise OSError(f"mount {' '.join(args)}: {result.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(size, ro=False)`: a small disk of its own (a tmpfs of `size`, in mount's units: 8m, 64k)
    under tmp_path, unmounted after the test; skips where this process may not mount one."""
    mounted: list[Path] = []

    def make(size: str, ro: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        try:
            _mount("-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(where))
        except OSError as e:  # FileNotFoundError included: no mount command
            pytest.skip(f"cannot mount a tmpfs here (needs root, in a container that allows mounts): {e}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, options: str) -> None:
    """Remount a `tmpfs` disk with other options: ro, rw, size=..."""
    _mount("-o", f"remount,{options}", str(where))


def stop_at_training_step(monkeypatch, k: int) -> None:
    """Send this process SIGINT inside the k-th training forward pass of train.py, as Ctrl-C would."""
    import training.run
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(*args, **kwargs)
    monkeypatch.setattr(training.run, "F", types.SimpleNamespace(cross_entropy=cross_entropy))


def final_state(out: Path):
    """A finished run's weights, optimizer state and history, from its last.pth."""
    import train
    last = load_checkpoint(out / train.LAST_NAME)
    return last["model"], last["optimizer"]["state"], last["progress"]["history"]


def assert_same_run(a, b) -> None:
    """Two runs' final_state() are the same, bit for bit (but the measured times)."""
    (wa, oa, ha), (wb, ob, hb) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)
    timing = ("seconds", "per_second")  # measured, so never the same twice
    strip = lambda h: [{k: v for k, v in row.items() if not k.endswith(timing)} for row in h]
    assert strip(ha) == strip(hb)


def save_breaking_on(name: str, then: Callable[[], None]) -> Callable:
    """torch.save that, for the temporary file of a write of `name`, writes half of the bytes, flushes
    them and calls `then` (which raises, as a full disk does, or hangs, to be killed)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not Path(getattr(f, "name", "")).name.startswith(f".{name}."):
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getbuffer()[: whole.tell() // 2])
        f.flush()
        then()
    return save
