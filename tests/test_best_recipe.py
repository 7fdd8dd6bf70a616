"""--recipe best and what it brings: --activation, --augment trivialaugment (per image, seeded by
image), a checkpoint that rebuilds its activation in evaluate.py, export.py and hubconf.py."""
import numpy as np
import pytest
import torch
from torch import nn

import evaluate
import export
import hubconf
import train
from conftest import synthetic_images, tiny_train_args
from data import TorchvisionLoader, policy_transform
from model import ACTIVATIONS, build_model, count_parameters, make_activation, resnet9
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.config import RECIPES, fresh_config
from training.device_loader import DeviceLoader, augmented_examples
from training.policy_workers import PolicyEpochs, apply_policy, default_policy_workers, policy_seeds

CPU = torch.device("cpu")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return synthetic_images(rng.integers(0, 10, n), rng)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_keeps_the_papers_parameter_count_and_is_used(name):
    model = resnet9(activation=name)
    assert count_parameters(model) == 4_903_242
    kinds = {type(m) for m in model.modules() if type(m) in ACTIVATIONS.values()}
    assert kinds == {ACTIVATIONS[name]}
    x = torch.randn(2, 3, 32, 32)
    if name != "relu":  # the output depends on which nonlinearity runs
        torch.manual_seed(0)
        relu = resnet9().eval()
        torch.manual_seed(0)
        other = resnet9(activation=name).eval()
        assert not torch.allclose(relu(x), other(x))
    with pytest.raises(ValueError, match="unknown activation"):
        build_model("resnet9", 10, "swish")


def test_best_recipe_values():
    best = fresh_config({"recipe": "best"})
    for key, value in RECIPES["best"].items():
        assert getattr(best, key) == value
    # The budget and protocol the recipe promises: the paper's 100 epochs, all training images, the
    # test set evaluated after the last epoch only (so it chooses nothing), crop-flip-cutout-TA.
    assert best.epochs == 100 and best.val_size == 0 and best.eval_every >= best.epochs
    assert best.augment == "trivialaugment" and best.cutout == 16 and best.rotation == 0
    assert best.activation == "relu" and best.arch == "resnet9"
    assert fresh_config({"recipe": "best", "activation": "elu"}).activation == "elu"


def test_policy_depends_only_on_the_image_seed_and_leaves_the_global_rng_alone():
    images = torch.from_numpy(_images(16).transpose(0, 3, 1, 2).copy())
    policy = policy_transform("trivialaugment")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = apply_policy(images, list(range(16)), policy)
    assert torch.equal(torch.get_rng_state(), before)
    b = apply_policy(images.flip(0), list(range(16))[::-1], policy).flip(0)  # other order, same seeds per image
    assert torch.equal(a, b)
    c = apply_policy(images, list(range(100, 116)), policy)
    assert not torch.equal(a, c)
    assert (a != images).flatten(1).any(1).float().mean() > 0.5  # most images are changed
    assert policy_transform("none") is None
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        policy_transform("randaugment")


def test_the_activations_are_four_different_functions():
    x = torch.linspace(-4, 4, 801)
    outputs = {name: make_activation(name)(x) for name in ACTIVATIONS}
    for a in outputs:
        for b in outputs:
            if a < b:
                assert (outputs[a] - outputs[b]).abs().max() > 0.01, (a, b)  # CELU at alpha 1 would be ELU
    assert make_activation("celu").alpha == 0.075


def test_device_loader_with_the_policy_is_seeded_resumable_and_the_same_per_rank():
    images, labels = _images(32), np.arange(32) % 10
    common = {"seed": 0, "device": CPU, "rotation": 0.0, "cutout": 8}

    def epoch(loader, e, start=0):
        loader.set_epoch(e, start)
        return [x for x, _ in loader]

    plain = epoch(DeviceLoader(images, labels, 8, **common), 1)
    full = epoch(DeviceLoader(images, labels, 8, policy="trivialaugment", **common), 1)
    again = epoch(DeviceLoader(images, labels, 8, policy="trivialaugment", **common), 1)
    assert all(torch.equal(a, b) for a, b in zip(full, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(full, plain, strict=True))
    tail = epoch(DeviceLoader(images, labels, 8, policy="trivialaugment", **common), 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail, strict=True))
    ranks = [epoch(DeviceLoader(images, labels, 4, policy="trivialaugment", rank=r, world_size=2, **common), 1)
             for r in range(2)]
    for step, x in enumerate(full):
        assert torch.equal(torch.stack([ranks[0][step], ranks[1][step]], 1).reshape(x.shape), x)
    shown = augmented_examples(images[:8], 0, 0.0, n=8, cutout=8, policy="trivialaugment")
    assert shown.dtype == torch.uint8 and shown.shape == (8, 3, 32, 32)


def test_policy_workers_give_the_pixels_of_the_policy_in_line():
    images = _images(23)
    host = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    policy = policy_transform("trivialaugment")
    pool = PolicyEpochs(host, 3, "trivialaugment", 2, chunk=5)  # 5 chunks, the last one short
    try:
        for e in (1, 2, 4, 2):  # in order (prefetched), a skip and a step back (the workers start again)
            want = apply_policy(host, policy_seeds(3, e, list(range(23))), policy)
            assert torch.equal(pool.epoch(e), want)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="at least one worker"):
        PolicyEpochs(host, 3, "trivialaugment", 0)
    assert default_policy_workers(CPU) == 0


def test_device_loader_with_policy_workers_hands_out_the_same_batches():
    images, labels = _images(32), np.arange(32) % 10
    common = {"seed": 0, "device": CPU, "rotation": 0.0, "cutout": 8, "policy": "trivialaugment"}

    def epochs(loader, plan):
        out = []
        for e, start in plan:
            loader.set_epoch(e, start)
            out += [x for x, _ in loader]
        loader.close()
        return out

    plan = [(1, 0), (2, 0), (3, 2), (5, 0)]  # a resume in the middle of epoch 3, then a skipped epoch
    inline = epochs(DeviceLoader(images, labels, 8, **common), plan)
    pooled = epochs(DeviceLoader(images, labels, 8, policy_workers=2, **common), plan)
    assert len(inline) == 4 + 4 + 2 + 4
    assert all(torch.equal(a, b) for a, b in zip(inline, pooled, strict=True))


@pytest.mark.slow
def test_a_run_with_policy_workers_trains_the_same_weights(tiny_cifar, tmp_path, capsys):
    runs = {}
    for workers in ("0", "2"):  # tiny_train_args says --workers 0; the later flag wins
        out = tmp_path / f"w{workers}"
        assert train.main(tiny_train_args(tiny_cifar, out, "--recipe", "best", "--epochs", "1", "--batch-size", "32",
                                          "--val-size", "0", "--workers", workers)) == 0
        runs[workers] = load_checkpoint(out / train.LAST_NAME)["model"]
        first = capsys.readouterr().out.splitlines()[0]
        assert ("trivialaugment in 2 worker(s)" in first) == (workers == "2")
    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])


def test_torchvision_loader_applies_the_policy():
    images, labels = _images(16), np.arange(16) % 10
    plain = TorchvisionLoader(images, labels, 16, seed=0, workers=0, device=CPU, rotation=0.0)
    policy = TorchvisionLoader(images, labels, 16, seed=0, workers=0, device=CPU, rotation=0.0,
                               policy="trivialaugment")
    for loader in (plain, policy):
        loader.set_epoch(1)
    (a, ya), (b, yb) = next(iter(plain)), next(iter(policy))
    assert torch.equal(ya, yb) and not torch.equal(a, b)


@pytest.mark.slow
def test_best_recipe_with_elu_trains_and_the_checkpoint_rebuilds_elu_everywhere(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_cifar, out, "--recipe", "best", "--activation", "elu", "--epochs", "2",
                           "--batch-size", "32", "--val-size", "0")
    assert train.main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "resnet9 (elu)" in first and "once, after the last epoch" in first and "trivialaugment" in first
    best = load_checkpoint(out / train.BEST_NAME)
    assert best["config"]["activation"] == "elu" and best["config"]["augment"] == "trivialaugment"
    history = best["history"]
    assert history[0]["val_acc"] is None and history[1]["val_acc"] is not None  # the test set: once, at the end
    model = model_from_checkpoint(best)
    assert any(isinstance(m, nn.ELU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    hub = hubconf.resnet9(pretrained=True, weights=str(out / train.BEST_NAME))
    assert any(isinstance(m, nn.ELU) for m in hub.modules()) and not hub.training
    assert evaluate.main([str(out / train.BEST_NAME), "--data-dir", str(tiny_cifar), "--device", "cpu",
                          "--out", str(tmp_path / "eval")]) == 0
    assert f"{history[1]['val_acc']:.2f}%" in capsys.readouterr().out  # evaluate.py rebuilt the same network
    fresh = hubconf.resnet9(activation="gelu")
    assert any(isinstance(m, nn.GELU) for m in fresh.modules())
    pytest.importorskip("onnxruntime", reason="ONNX export needs requirements-optional.txt")
    code = export.main([str(out / train.BEST_NAME), "--format", "onnx", "--out", str(tmp_path / "elu.onnx"),
                        "--data-dir", str(tiny_cifar), "--batch-size", "16"])
    text = capsys.readouterr().out
    assert code == 0 and "top-1 agreement 100.00%" in text  # onnxruntime runs the ELU graph as PyTorch does


def test_a_checkpoint_naming_an_unknown_activation_is_refused_in_one_line(trained_run, tmp_path):
    ckpt = load_checkpoint(trained_run / train.BEST_NAME)
    ckpt["config"]["activation"] = "swish"
    save_checkpoint(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="activation='swish'"):
        load_checkpoint(tmp_path / "bad.pth")
