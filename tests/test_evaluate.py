"""evaluate.py end to end, and every kind of bad checkpoint it may be handed."""
import json
import pickle
import zipfile

import pytest
import torch

import evaluate
import train
from model import BasicBlock, ResNet
from training.checkpoint import save_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


def test_evaluate_end_to_end(trained_run, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "eval"
    ckpt = trained_run / train.BEST_NAME
    assert evaluate.main([str(ckpt), "--data-dir", str(tiny_cifar), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 50 and 0 <= report["accuracy"] <= 100 and report["loss"] > 0
    assert f"top-1 accuracy {report['accuracy']:.2f}%" in text and "airplane" in text
    assert set(report["per_class_accuracy"]) == set(evaluate.CLASSES)
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 50 and (cm.sum(1) == 5).all()
    assert abs(cm.diag().sum().item() / 50 * 100 - report["accuracy"]) < 1e-6
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "loss_curve.png", "accuracy_curve.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert str(out / name) in text


def test_classification_report_counts():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    labels = torch.tensor([0, 1, 1, 2])
    r = evaluate.classification_report(logits, labels, ("a", "b", "c"))
    assert r["accuracy"] == 75.0 and r["per_class_accuracy"] == {"a": 100.0, "b": 50.0, "c": 100.0}
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(trained_run, tmp_path):
    good = (trained_run / train.BEST_NAME).read_bytes()
    marker = tmp_path / "code_ran"
    other = ResNet(BasicBlock, [2, 2, 2, 2])
    cases = {
        "missing": (None, "no such file"),
        "directory": ("dir", "not a file"),
        "random_bytes": (b"\x00\x01 certainly not a checkpoint" * 50, "not a readable checkpoint"),
        "json": (b'{"model": {}}', "not a readable checkpoint"),
        "truncated": (good[: len(good) // 3], "not a readable checkpoint"),
        "plain_tensor": ("tensor", "not a checkpoint of this project"),
        "other_architecture": ({"model": other.state_dict(), "config": {"arch": "resnet9"}},
                               "holds a different architecture"),
        "unknown_arch": ({"model": {}, "config": {"arch": "vgg"}}, "unknown architecture"),
        "code_payload": ({"model": {}, "config": _Payload(marker)}, "refused"),
        "raw_pickle_payload": (pickle.dumps(_Payload(marker), protocol=2), "refused"),
        "raw_pickle_protocol_4": (pickle.dumps(_Payload(marker), protocol=4), "not a readable checkpoint"),
    }
    paths = {}
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        if content == "dir":
            path.mkdir()
        elif content == "tensor":
            torch.save(torch.zeros(3), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            save_checkpoint(content, path)  # as this project writes checkpoints: with their digest
        paths[name] = (path, message)
    return paths, marker


def test_bad_checkpoints_give_one_clear_error_and_run_nothing(trained_run, tiny_cifar, tmp_path, capsys):
    paths, marker = _bad_checkpoints(trained_run, tmp_path)
    for name, (path, message) in paths.items():
        code = evaluate.main([str(path), "--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, (name, err)
    assert not marker.exists()
    assert zipfile.is_zipfile(trained_run / train.BEST_NAME)  # untouched


def test_bad_batch_size_is_rejected(trained_run, capsys):
    assert evaluate.main([str(trained_run / train.BEST_NAME), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_state_dict_keys_load(trained_run, tmp_path, prefix):
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(trained_run / train.BEST_NAME)
    ckpt["model"] = {prefix + k: v for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, tmp_path / "wrapped.pth")  # a new digest: the renamed tensors are another checkpoint
    model = model_from_checkpoint(load_checkpoint(tmp_path / "wrapped.pth"))
    assert torch.equal(model.conv1.weight, load_checkpoint(trained_run / train.BEST_NAME)["model"]["conv1.weight"])


def test_tta_shift_averages_six_views_moved_with_a_black_border():
    """--tta-shift 2: the logits are the mean over the image, the image moved 2 px down-right and 2 px
    up-left, and the mirror image of each; uncovered pixels are black (zero before normalisation),
    as the training crop's padding is."""
    from data import normalize_batch
    from training.evaluation import forward, shifted

    x = normalize_batch(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    black = normalize_batch(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    down = shifted(x, 2, 2)
    assert torch.equal(down[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(down[..., :2, :], black.expand(3, 3, 2, 32))
    up = shifted(x, -2, -2)
    assert torch.equal(up[..., :-2, :-2], x[..., 2:, 2:]) and torch.equal(up[..., -2:, :], black.expand(3, 3, 2, 32))

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    logits = forward(model, x, tta=True, shift=2)
    views = [x, x.flip(3), down, down.flip(3), up, up.flip(3)]
    assert len(seen) == 6 and all(any(torch.equal(s, v) for s in seen) for v in views)
    expected = torch.stack([model(v) for v in views]).mean(0)
    torch.testing.assert_close(logits, expected)
    assert torch.equal(forward(model, x, tta=True, shift=0), (model(x) + model(x.flip(3))) / 2)


@pytest.mark.slow
def test_tta_shift_comes_from_the_checkpoint_unless_given(trained_run, tiny_cifar, tmp_path, capsys):
    """evaluate.py --tta uses the checkpoint's own --tta-shift (0 for the paper's recipe: 2 views),
    --tta-shift N overrides it (6 views), and a shift outside 0..16 is one line with exit 2."""
    ckpt = torch.load(trained_run / train.BEST_NAME, map_location="cpu", weights_only=True)
    assert ckpt["config"]["tta_shift"] == 0
    common = [str(trained_run / train.BEST_NAME), "--data-dir", str(tiny_cifar), "--tta", "--no-robustness"]
    reports = {}
    for extra in ([], ["--tta-shift", "2"]):
        out = tmp_path / f"eval{len(extra)}"
        assert evaluate.main([*common, *extra, "--out-dir", str(out)]) == 0
        reports[len(extra)] = json.loads((out / "report.json").read_text())["tta"]
    text = capsys.readouterr().out
    assert "TTA (mean of image and mirror image)" in text and "TTA (6 views" in text
    assert reports[0]["shift"] == 0 and reports[2]["shift"] == 2
    shifted = dict(ckpt, config={**ckpt["config"], "tta_shift": 3})
    save_checkpoint(shifted, tmp_path / "shift3.pth")
    assert evaluate.main([str(tmp_path / "shift3.pth"), *common[1:], "--out-dir", str(tmp_path / "e3")]) == 0
    assert json.loads((tmp_path / "e3" / "report.json").read_text())["tta"]["shift"] == 3
    capsys.readouterr()
    assert evaluate.main([*common, "--tta-shift", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tta-shift" in err
