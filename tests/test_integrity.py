"""Checkpoint integrity: the SHA-256 of a checkpoint's tensors is recorded on save and checked on load.

The zip format torch.save writes has no checksum, so a flipped bit inside a tensor's bytes used to
load silently. These tests flip bytes inside a tensor's storage in a saved file and expect one clear
line naming the file; a checkpoint without the digest (written before it existed) still loads, noted once.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import evaluate
import train
from model import resnet9
from training import checkpoint
from training.checkpoint import DIGEST_KEY, CheckpointError, load_checkpoint, save_checkpoint, tensor_digest


def _storage_span(path: Path, entry_suffix: str) -> tuple[int, int]:
    """Where the raw bytes of the zip entry ending in `entry_suffix` (a tensor's storage) lie in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(entry_suffix))
    assert info.compress_type == zipfile.ZIP_STORED  # torch.save stores tensors uncompressed
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.file_size


def _flip(path: Path, at: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ mask]))


def _small_checkpoint(path: Path) -> dict:
    model = resnet9()
    obj = {"model": model.state_dict(), "config": {"arch": "resnet9", "num_classes": 10}, "epoch": 3}
    save_checkpoint(obj, path)
    return obj


def _largest_storage(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename]
    return max(data, key=lambda i: i.file_size).filename.split("/", 1)[1]


def test_save_records_a_digest_that_load_checks(tmp_path):
    path = tmp_path / "ok.pth"
    obj = _small_checkpoint(path)
    loaded = load_checkpoint(path)
    assert loaded[DIGEST_KEY] == tensor_digest(obj) and len(loaded[DIGEST_KEY]) == 64
    # the memory layout a tensor was saved in does not change its digest; its values and names do
    cl = {**obj, "model": {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
                           for k, v in obj["model"].items()}}
    assert tensor_digest(cl) == tensor_digest(obj)
    changed = {**obj, "model": {**obj["model"], "linear.bias": obj["model"]["linear.bias"] + 1e-6}}
    renamed = {**obj, "model": {("x" + k if k == "linear.bias" else k): v for k, v in obj["model"].items()}}
    assert tensor_digest(changed) != tensor_digest(obj) and tensor_digest(renamed) != tensor_digest(obj)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_bit_in_tensor_data_is_one_clear_error_naming_the_file(tmp_path, where):
    path = tmp_path / "flipped.pth"
    _small_checkpoint(path)
    start, end = _storage_span(path, _largest_storage(path))
    _flip(path, {"first": start, "middle": (start + end) // 2, "last": end - 1}[where], 0x10)
    torch.load(path, weights_only=True)  # the zip itself still loads: only the digest can tell
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"{path}: its tensors do not match the SHA-256 recorded when it was saved "
                            "(bits changed on disk or in transfer); the file is damaged, use another copy")


def test_a_damaged_training_checkpoint_is_refused_by_both_clis(trained_run, tmp_path, capsys):
    for name, run in ((train.BEST_NAME, lambda p: evaluate.main([str(p), "--image", "x.png", "--device", "cpu"])),
                      (train.LAST_NAME, lambda p: train.main(["--resume", str(p), "--device", "cpu"]))):
        path = tmp_path / name
        path.write_bytes((trained_run / name).read_bytes())
        start, end = _storage_span(path, _largest_storage(path))
        _flip(path, start + (end - start) // 3, 0x80)
        assert run(path) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: its tensors do not match the SHA-256"), err


def test_a_checkpoint_without_a_digest_loads_with_one_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "_noted_unchecked", set())
    path = tmp_path / "old.pth"
    obj = {"model": resnet9().state_dict(), "config": {"arch": "resnet9", "num_classes": 10}, "epoch": 1}
    torch.save(obj, path)  # as checkpoints were written before the digest
    for _ in range(3):
        assert torch.equal(load_checkpoint(path)["model"]["conv1.weight"], obj["model"]["conv1.weight"])
    err = capsys.readouterr().err
    assert err == (f"note: {path} records no SHA-256 of its tensors (written before checkpoints carried one); "
                   "loaded without that check\n")


@pytest.mark.parametrize("value", [5, "abc", torch.zeros(3), "0" * 63 + "g"])
def test_a_damaged_digest_is_refused(tmp_path, value):
    path = tmp_path / "bad.pth"
    torch.save({**load_checkpoint(_save_and_path(tmp_path)), DIGEST_KEY: value}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: its recorded SHA-256 is not a digest; the file is damaged$"):
        load_checkpoint(path)


def _save_and_path(tmp_path: Path) -> Path:
    path = tmp_path / "good.pth"
    _small_checkpoint(path)
    return path


def test_every_checkpoint_a_run_writes_carries_a_valid_digest(trained_run):
    for name in (train.BEST_NAME, train.LAST_NAME):
        ckpt = torch.load(trained_run / name, weights_only=True)
        assert ckpt[DIGEST_KEY] == tensor_digest(ckpt), name
    last = torch.load(trained_run / train.LAST_NAME, weights_only=True)
    last["optimizer"]["state"][0]["momentum_buffer"][0] += 1  # optimizer state is covered too, not only weights
    assert tensor_digest(last) != last[DIGEST_KEY]
