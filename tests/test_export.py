"""export.py (safetensors and ONNX), evaluate.py reading a .safetensors file, and hubconf.py.

Each ONNX export takes ~15 s on 2 CPU cores, so there are two: one good (shared by the tests that
read it), one whose graph forgets the normalisation, which the check must catch.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import export
import train
from conftest import ROOT
from data import CLASSES, TEST_FILE, normalize_batch, read_batch
from training.checkpoint import DIGEST_KEY, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint


def _one_line(code: int, err: str, expect: int, *needles: str) -> None:
    assert code == expect and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert all(n in err for n in needles), err


def _no_temporary_files(folder: Path) -> None:
    assert not list(folder.glob(".*.tmp")), list(folder.iterdir())


# ----------------------------------------------------------------------------- safetensors

@pytest.fixture(scope="module")
def weights_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st") / "resnet9.safetensors"
    assert export.main([str(trained_run / train.BEST_NAME), "--format", "safetensors", "--out", str(out)]) == 0
    return out


def test_safetensors_holds_every_tensor_and_the_metadata_and_no_pickle(trained_run, weights_file):
    from safetensors import safe_open
    best = load_checkpoint(trained_run / train.BEST_NAME)
    assert weights_file.read_bytes()[8:9] == b"{"  # a JSON header, then raw bytes: nothing to unpickle
    with safe_open(weights_file, framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == set(best["model"]) and any(k.endswith("running_var") for k in keys)  # BatchNorm buffers too
    assert any(k.endswith("num_batches_tracked") for k in keys)
    for key, value in best["model"].items():
        assert torch.equal(tensors[key], value), key
    assert json.loads(meta["config"]) == best["config"] and json.loads(meta["classes"]) == list(CLASSES)
    assert meta["epoch"] == str(best["epoch"]) and len(meta[DIGEST_KEY]) == 64 and "normalised" in meta["input"]


@pytest.mark.slow
def test_evaluate_reads_safetensors_and_reports_the_same_numbers(trained_run, weights_file, tiny_cifar, tmp_path):
    reports = {}
    for name, path in (("pth", trained_run / train.BEST_NAME), ("st", weights_file)):
        assert evaluate.main([str(path), "--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / name),
                              "--no-robustness", "--device", "cpu"]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    for key in ("loss", "accuracy", "confusion_matrix", "top3_accuracy"):
        assert reports["st"][key] == reports["pth"][key], key
    assert reports["st"]["epoch"] == reports["pth"]["epoch"]


def test_damaged_or_unreadable_safetensors_is_one_clear_line(weights_file, tmp_path, capsys, monkeypatch):
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x04  # inside the tensors' bytes
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights_file.read_bytes()[:100_000])
    for path, message in ((flipped, "its tensors do not match the SHA-256"),
                          (truncated, "not a readable .safetensors file")):
        code = evaluate.main([str(path), "--image", "x.png", "--device", "cpu"])
        _one_line(code, capsys.readouterr().err, 2, f"error: {path}: {message}")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if the optional package were not installed
    code = evaluate.main([str(weights_file), "--image", "x.png", "--device", "cpu"])
    _one_line(code, capsys.readouterr().err, 2, "needs the safetensors package", "requirements-optional.txt")


# ----------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_file(trained_run, tiny_cifar, tmp_path_factory) -> tuple[Path, str]:
    out, buffer = tmp_path_factory.mktemp("onnx") / "resnet9.onnx", io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = export.main([str(trained_run / train.BEST_NAME), "--format", "onnx", "--out", str(out),
                            "--data-dir", str(tiny_cifar), "--batch-size", "16"])
    assert code == 0, buffer.getvalue()
    return out, buffer.getvalue()


def test_onnx_export_is_checked_on_the_test_images_and_agrees(onnx_file):
    out, text = onnx_file
    assert "checked on the first 50 test images of" in text  # the tiny folder has 50
    assert "top-1 agreement 100.00%" in text and "onnxruntime" in text and "images/s" in text
    diff = float(text.split("largest |logit difference| ")[1].split()[0])
    assert 0 <= diff <= export.LOGIT_TOLERANCE
    _no_temporary_files(out.parent)


def test_onnx_takes_uint8_images_of_any_batch_and_matches_evaluate(onnx_file, trained_run, tiny_cifar):
    import onnx
    import onnxruntime as ort
    out, _ = onnx_file
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == export.ONNX_OPSET
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES) and "uint8 [batch, 32, 32, 3]" in meta["input"]
    assert json.loads(meta["config"]) == load_checkpoint(trained_run / train.BEST_NAME)["config"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("images", "tensor(uint8)", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [32, 32, 3]  # a named, dynamic batch axis
    images, _ = read_batch(Path(tiny_cifar) / "cifar-10-batches-py" / TEST_FILE)
    model = model_from_checkpoint(load_checkpoint(trained_run / train.BEST_NAME)).eval()
    for n in (1, 7):  # batch sizes the export never saw
        with torch.inference_mode():  # evaluate.py's own path: NCHW, normalize_batch, the model
            expected = model(normalize_batch(torch.from_numpy(images[:n]).permute(0, 3, 1, 2))).numpy()
        got = session.run(None, {"images": images[:n]})[0]
        assert got.shape == (n, 10) and np.abs(got - expected).max() <= export.LOGIT_TOLERANCE


def test_an_onnx_graph_that_disagrees_is_deleted_and_the_old_file_kept(trained_run, tmp_path, capsys, monkeypatch):
    """The graph is exported without the normalisation (a real conversion mistake); the check on
    random images (no --data-dir) catches it, deletes the new file and leaves the old --out alone."""
    real_export = export.export_onnx

    def forgets_normalisation(model, meta, path):
        with monkeypatch.context() as m:
            m.setattr(export, "normalize_batch", lambda x: x.float())
            real_export(model, meta, path)
    monkeypatch.setattr(export, "export_onnx", forgets_normalisation)
    out = tmp_path / "resnet9.onnx"
    out.write_bytes(b"an earlier export")
    code = export.main([str(trained_run / train.BEST_NAME), "--format", "onnx", "--out", str(out), "--limit", "20"])
    captured = capsys.readouterr()
    _one_line(code, captured.err, 1, f"error: {out}: onnxruntime's logits differ from PyTorch's by up to",
              "the file was not kept")
    assert "20 random images (no --data-dir given" in captured.out
    diff = float(captured.err.split("by up to ")[1].split()[0])
    assert diff > 100 * export.LOGIT_TOLERANCE  # such a mistake is far beyond the tolerance
    assert out.read_bytes() == b"an earlier export"
    _no_temporary_files(tmp_path)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["no_file", "not_a_checkpoint", "out_below_a_file", "out_is_a_folder",
                                  "missing_onnxruntime", "missing_safetensors", "bad_data_dir", "bad_limit"])
def test_bad_input_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys, monkeypatch, case):
    ckpt, out, fmt, extra = trained_run / train.BEST_NAME, tmp_path / "x.onnx", "onnx", []
    blocker = tmp_path / "a_file"
    blocker.write_text("a file")
    needle = {"no_file": "no such file", "not_a_checkpoint": "not a readable checkpoint",
              "out_below_a_file": "cannot write there", "out_is_a_folder": "is a folder",
              "missing_onnxruntime": "requirements-optional.txt", "missing_safetensors": "requirements-optional.txt",
              "bad_data_dir": "CIFAR-10 is not in", "bad_limit": "must be at least 1"}[case]
    if case == "no_file":
        ckpt = tmp_path / "absent.pth"
    elif case == "not_a_checkpoint":
        ckpt = blocker
    elif case == "out_below_a_file":
        out = blocker / "x.onnx"
    elif case == "out_is_a_folder":
        out = tmp_path
    elif case == "missing_onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
    elif case == "missing_safetensors":
        fmt, out = "safetensors", tmp_path / "x.safetensors"
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    elif case == "bad_data_dir":
        extra = ["--data-dir", str(tmp_path / "nowhere")]
    else:
        extra = ["--limit", "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = export.main([str(ckpt), "--format", fmt, "--out", str(out), *extra])
    _one_line(code, capsys.readouterr().err, 2, "error: ", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and blocker.read_text() == "a file"


# ----------------------------------------------------------------------------- torch.hub

def test_hub_load_returns_the_weights_in_eval_mode_or_a_fresh_model(trained_run, weights_file, monkeypatch):
    best = load_checkpoint(trained_run / train.BEST_NAME)
    for weights in (trained_run / train.BEST_NAME, weights_file):
        model = torch.hub.load(str(ROOT), "resnet9", source="local", pretrained=True, weights=str(weights))
        assert not model.training and torch.equal(model.conv1.weight, best["model"]["conv1.weight"])
        assert torch.equal(model.bn1.running_var, best["model"]["bn1.running_var"])
    fresh = torch.hub.load(str(ROOT), "resnet9", source="local", pretrained=False)
    assert fresh.training and not torch.equal(fresh.conv1.weight, best["model"]["conv1.weight"])
    assert sum(p.numel() for p in fresh.parameters()) == 4_903_242

    import hubconf
    assert hubconf.SHIPPED_WEIGHTS == ROOT / "model" / train.BEST_NAME
    monkeypatch.setattr(hubconf, "SHIPPED_WEIGHTS", trained_run / train.BEST_NAME)  # stands in for the shipped file
    model = hubconf.resnet9(pretrained=True)
    assert not model.training and torch.equal(model.linear.weight, best["model"]["linear.weight"])
    monkeypatch.setattr(hubconf, "SHIPPED_WEIGHTS", trained_run / "absent.pth")
    with pytest.raises(CheckpointError, match="absent.pth: no such file"):
        hubconf.resnet9(pretrained=True)
    with pytest.raises(ValueError, match="holds a model for 10 classes, not num_classes=100"):
        hubconf.resnet9(pretrained=True, weights=str(trained_run / train.BEST_NAME), num_classes=100)


@pytest.mark.skipif(not (ROOT / "model" / train.BEST_NAME).is_file(), reason="no shipped checkpoint in this clone")
def test_hub_loads_the_shipped_checkpoint():
    model = torch.hub.load(str(ROOT), "resnet9", source="local", pretrained=True)
    assert not model.training and model.linear.out_features == 10


def test_save_checkpoint_helper_is_what_export_reads(tmp_path):
    """A checkpoint holding only a state dict and a config (no history, no metrics) exports too."""
    from model import resnet9
    path = tmp_path / "bare.pth"
    save_checkpoint({"model": resnet9().state_dict(), "config": {"arch": "resnet9", "num_classes": 10}}, path)
    assert export.main([str(path), "--format", "safetensors", "--out", str(tmp_path / "bare.safetensors")]) == 0
    assert load_checkpoint(tmp_path / "bare.safetensors")["epoch"] == 0
