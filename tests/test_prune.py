"""prune.py: structured pruning keeps the network whole (residual sums, shortcuts, classes), reaches
the FLOPs asked, writes a checkpoint every reader takes, and fine-tunes through train.py's fit."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import evaluate
import export
import hubconf
import prune
import train
from model import STANDARD_WIDTHS, BasicBlock, resnet9, widths_of
from training.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint

tp = pytest.importorskip("torch_pruning")  # requirements-optional.txt


def _prune(argv: list[str]) -> int:
    """prune.main's exit code, also where argparse exits."""
    try:
        return prune.main(argv)
    except SystemExit as e:
        return e.code


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert all(n in err for n in needles), err


def _trained_like(seed: int = 0, widths=(), num_classes: int = 10) -> nn.Module:
    """A ResNet9 whose BatchNorm scales, shifts and statistics are not all alike, as a trained one's are not."""
    torch.manual_seed(seed)
    model = resnet9(num_classes, widths=widths)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _residual_shapes(model: nn.Module) -> list[tuple[torch.Size, torch.Size]]:
    """(the block's residual branch, its shortcut) output shapes at each of the four residual sums."""
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    shapes: list[dict] = [{} for _ in blocks]
    hooks = []
    for block, got in zip(blocks, shapes, strict=True):
        hooks += [block.bn2.register_forward_hook(lambda m, i, o, got=got: got.__setitem__("branch", o.shape)),
                  block.shortcut.register_forward_hook(lambda m, i, o, got=got: got.__setitem__("shortcut", o.shape))]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    return [(got["branch"], got["shortcut"]) for got in shapes]


@pytest.mark.parametrize("importance", list(prune.IMPORTANCES))
def test_pruning_keeps_every_residual_sum_valid_and_rebuilds_from_widths(importance):
    model = _trained_like(num_classes=12)
    widths = [40, 24, 100, 60, 200, 130, 300, 250]  # every width changed, each group by another share
    prune.prune_to(model, widths, importance)
    assert widths_of(model) == widths
    assert model.linear.out_features == 12 and model.linear.in_features == 250  # the classes are never pruned
    assert model.conv1.out_channels == 24 and len(model.layer1[0].shortcut) == 0  # stem joined to stage 1's sum
    sums = _residual_shapes(model)
    assert len(sums) == 4 and all(branch == shortcut for branch, shortcut in sums), sums
    assert [s[0][1] for s in sums] == [24, 60, 130, 250]
    rebuilt = resnet9(12, widths=widths).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_the_channels_ranked_lowest_go_and_the_network_computes_what_it_did():
    """Channels inside the blocks whose BatchNorm scale and shift are 0 contribute nothing; pruning
    exactly those (BN-scale importance ranks them lowest) leaves the logits as they were. Pruning
    the wrong ones, or one layer of a pair but not the other, would change them."""
    model = _trained_like(seed=1)
    drop = {0: [3, 10, 63], 2: [0, 5, 77, 100], 4: [1, 2, 250], 6: list(range(0, 512, 7))}
    inner = [model.layer1[0].bn1, model.layer2[0].bn1, model.layer3[0].bn1, model.layer4[0].bn1]
    with torch.no_grad():
        for slot, channels in drop.items():
            bn = inner[slot // 2]
            bn.weight[channels] = 0
            bn.bias[channels] = 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    widths = list(STANDARD_WIDTHS)
    for slot, channels in drop.items():
        widths[slot] -= len(channels)
    prune.prune_to(model, widths, "bn")
    assert widths_of(model) == widths
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=0)
    assert (model.layer4[0].bn1.weight != 0).all()  # the zeroed ones are the ones gone


@pytest.mark.slow
@pytest.mark.parametrize("flops, round_to", [(0.75, 16), (0.5, 16), (0.25, 16), (0.5, 1), (0.5, 8)])
def test_the_flops_reached_are_within_5_percent_of_those_asked(trained_run, tmp_path, capsys, flops, round_to):
    out = tmp_path / "pruned.pth"
    assert prune.main([str(trained_run / train.BEST_NAME), "--flops", str(flops), "--out", str(out),
                       "--round-to", str(round_to)]) == 0
    ckpt = load_checkpoint(out)
    base = tp.utils.count_ops_and_params(resnet9().eval(), torch.zeros(1, 3, 32, 32))[0]
    model = model_from_checkpoint(ckpt, out).eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 32, 32))
    assert abs(macs / base - flops) <= 0.05 * flops, macs / base
    record = ckpt["pruning"]
    assert (record["macs"], record["params"], record["parent_macs"]) == (int(macs), int(params), int(base))
    assert record["widths"] == ckpt["config"]["widths"] == widths_of(model)
    assert all(w % round_to == 0 for w in record["widths"]) and record["round_to"] == round_to
    if round_to == 1:  # any width: within a channel or so of the budget
        assert abs(macs / base - flops) <= 0.01 * flops, macs / base
    assert f"asked {100 * flops:g}%" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pruned_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "pruned.pth"
    with contextlib.redirect_stdout(io.StringIO()):
        assert prune.main([str(trained_run / train.BEST_NAME), "--flops", "0.4", "--steps", "2",
                           "--importance", "group", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_pruned_checkpoint_is_plain_data_that_every_reader_takes(pruned_file, trained_run, tiny_cifar, tmp_path,
                                                                   capsys):
    raw = torch.load(pruned_file, map_location="cpu", weights_only=True)  # no pickled module inside
    assert raw["kind"] == "pruned" and len(raw["config"]["widths"]) == 8
    assert all(isinstance(v, torch.Tensor) for v in raw["model"].values())
    record = raw["pruning"]
    assert record["parent_sha256"] == file_sha256(trained_run / train.BEST_NAME) and record["importance"] == "group"
    assert len(record["step_widths"]) == 2 and record["step_widths"][-1] == raw["config"]["widths"]
    model = model_from_checkpoint(load_checkpoint(pruned_file), pruned_file).eval()
    assert widths_of(model) == raw["config"]["widths"] and widths_of(model) != list(STANDARD_WIDTHS)

    report_dir = tmp_path / "eval"
    assert evaluate.main([str(pruned_file), "--data-dir", str(tiny_cifar), "--out-dir", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["n"] == 50 and report["parameters"] == record["params"] and report["widths"] == record["widths"]
    assert f"{record['params']:,} parameters" in capsys.readouterr().out

    hub = hubconf.resnet9(pretrained=True, weights=str(pruned_file))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not hub.training and torch.equal(hub(x), model(x))
    weights = tmp_path / "pruned.safetensors"  # its config travels as JSON: the widths come back as a list
    assert export.main([str(pruned_file), "--format", "safetensors", "--out", str(weights)]) == 0
    with torch.no_grad():
        assert torch.equal(hubconf.resnet9(pretrained=True, weights=str(weights))(x), model(x))


@pytest.mark.slow
def test_a_pruned_checkpoint_exports_to_onnx_that_onnxruntime_agrees_with(pruned_file, tiny_cifar, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from data import TEST_FILE, normalize_batch, read_batch
    out, buffer = tmp_path / "pruned.onnx", io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = export.main([str(pruned_file), "--format", "onnx", "--out", str(out), "--data-dir", str(tiny_cifar),
                            "--batch-size", "16"])
    assert code == 0, buffer.getvalue()
    assert "top-1 agreement 100.00%" in buffer.getvalue()
    images, _ = read_batch(Path(tiny_cifar) / "cifar-10-batches-py" / TEST_FILE)
    model = model_from_checkpoint(load_checkpoint(pruned_file)).eval()
    with torch.inference_mode():
        expected = model(normalize_batch(torch.from_numpy(images[:7]).permute(0, 3, 1, 2))).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images[:7]})[0]
    assert np.abs(got - expected).max() <= export.LOGIT_TOLERANCE


@pytest.mark.slow
def test_iterative_pruning_fine_tunes_with_fit_and_the_fine_tune_resumes(trained_run, tiny_cifar, tmp_path, capsys):
    out, folder = tmp_path / "pruned.pth", tmp_path / "ft"
    flags = ["--data-dir", str(tiny_cifar), "--val-size", "20", "--workers", "0", "--device", "cpu", "--no-amp"]
    code = prune.main([str(trained_run / train.BEST_NAME), "--flops", "0.5", "--steps", "2", "--finetune-epochs", "3",
                       "--out", str(out), "--finetune-dir", str(folder), "--lr", "0.005", *flags])
    assert code == 0, capsys.readouterr().err
    steps = [load_checkpoint(folder / f"step-{k}" / train.LAST_NAME) for k in (1, 2)]
    assert [s["config"]["epochs"] for s in steps] == [1, 2]  # 3 epochs split over 2 steps, the rest to the last
    assert all(s["config"]["lr"] == 0.005 for s in steps)  # the flags given change the parent's recipe
    assert steps[0]["config"]["widths"] != steps[1]["config"]["widths"]
    pruned = load_checkpoint(out)
    assert pruned["config"]["widths"] == steps[1]["config"]["widths"] == pruned["pruning"]["widths"]
    assert pruned["history"] == load_checkpoint(folder / "step-2" / train.BEST_NAME)["history"]
    best = load_checkpoint(folder / "step-2" / train.BEST_NAME)["model"]
    assert all(torch.equal(pruned["model"][k], best[k]) for k in best)
    capsys.readouterr()
    resume = ["--resume", str(folder / "step-2" / train.LAST_NAME), "--epochs", "3", "--device", "cpu",
              "--workers", "0"]
    assert train.main(resume) == 0  # the fine-tune is an ordinary run
    last = load_checkpoint(folder / "step-2" / train.LAST_NAME)
    assert last["epoch"] == 3 and last["config"]["widths"] == pruned["config"]["widths"]


@pytest.mark.parametrize(("flags", "needles"), [
    (["--flops", "1.5"], ["--flops", "not a fraction in (0, 1)"]),
    (["--flops", "0.5", "--lr", "0.1"], ["--lr is for the fine-tune", "--finetune-epochs is 0"]),
    (["--flops", "0.5", "--widths", "8,8,8,8,8,8,8,8"], ["--widths is what prune.py decides"]),
    (["--flops", "0.5", "--finetune-epochs", "2", "--epochs", "3"], ["--epochs", "--finetune-epochs"]),
    (["--flops", "0.5", "--resume", "x/last.pth"], ["--resume is train.py's"]),
    (["--flops", "0.5", "--importance", "random"], ["--importance", "invalid choice"]),
])
def test_bad_flags_are_one_line(trained_run, tmp_path, capsys, flags, needles):
    code = _prune([str(trained_run / train.BEST_NAME), "--out", str(tmp_path / "p.pth"), *flags])
    _one_line(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "p.pth").exists()


def test_an_existing_out_is_kept_without_overwrite_and_missing_torch_pruning_is_one_line(trained_run, tmp_path,
                                                                                       capsys, monkeypatch):
    out = tmp_path / "p.pth"
    out.write_bytes(b"keep")
    _one_line(prune.main([str(trained_run / train.BEST_NAME), "--flops", "0.5", "--out", str(out)]),
              capsys.readouterr().err, "exists", "--overwrite")
    assert out.read_bytes() == b"keep"
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed
    _one_line(prune.main([str(trained_run / train.BEST_NAME), "--flops", "0.5", "--out", str(tmp_path / "q.pth")]),
              capsys.readouterr().err, "torch-pruning", "requirements-optional.txt")


def test_an_out_that_cannot_be_written_is_refused_before_pruning_and_a_failed_write_is_one_line(
        trained_run, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = _prune([str(trained_run / train.BEST_NAME), "--flops", "0.5", "--out", str(blocker / "pruned.pth")])
    err = capsys.readouterr()
    _one_line(code, err.err, "cannot write --out", "is a file, where a folder is needed")
    assert "step 1/1" not in err.out  # refused before any pruning
    out = tmp_path / "pruned.pth"
    out.write_bytes(b"an earlier file")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code = prune.main([str(trained_run / train.BEST_NAME), "--flops", "0.5", "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no space left" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"an earlier file"  # the file it would have replaced is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "pruned.pth"]  # no temporary file left


@pytest.mark.slow
def test_every_step_scales_the_parents_widths_and_rounds_them():
    base = list(STANDARD_WIDTHS)
    macs = prune.macs_of_widths(base, 10, "relu")
    first = prune.target_widths(base, base, 0.7 * macs, 10, "relu", round_to=16)
    second = prune.target_widths(base, first, 0.5 * macs, 10, "relu", round_to=16)
    assert all(w % 16 == 0 for w in first + second)
    assert all(b <= a for a, b in zip(first, second, strict=True)) and second != first  # never wider
    assert second == prune.target_widths(base, base, 0.5 * macs, 10, "relu", round_to=16)  # no drift over steps
    assert prune.target_widths(base, [8] * 8, 0.9 * macs, 10, "relu", round_to=16) == [8] * 8  # never grows
