"""The CUDA path: `python -m pytest -m cuda` runs these on a GPU (about a minute); without one they skip.

They cover what the CPU suite cannot: the device loader's pixels on the GPU, bf16 autocast, fused
SGD, torch.compile, CUDA-graph capture (warm-up, the partial last batch, optimizer state, reloaded
weights), --deterministic, train.py and evaluate.py end to end, CUDA checkpoints read on the CPU,
and NCCL under torchrun.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import train
from conftest import synthetic_images, write_cifar_folder
from model import resnet9
from training.checkpoint import load_checkpoint
from training.runtime import compile_model
from training.step import CudaGraphStep, EagerStep

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: CUDA tests skipped")]

ROOT = Path(__file__).resolve().parent.parent
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
OUTPUTS = {train.BEST_NAME, train.LAST_NAME, train.HISTORY_NAME, "loss_curve.png", "accuracy_curve.png"}


@pytest.fixture(autouse=True)
def _not_deterministic_after():
    """--deterministic is process-wide: turn it off after each test."""
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@pytest.fixture(scope="module")
def cuda_data(tmp_path_factory) -> Path:
    """2,000 synthetic training and 200 test images in the official layout."""
    return write_cifar_folder(tmp_path_factory.mktemp("cuda-data"), 200, 20)


def _args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--out", str(out), "--epochs", "1", "--val-size", "100",
            "--device", "cuda", *extra]


def _batches(images, labels, device, rotation):
    loader = data.DeviceLoader(images, labels, 64, seed=3, device=device, rotation=rotation,
                               epoch_chunk=256 if device.type == "cuda" else None)
    loader.set_epoch(2)
    return [(x.cpu(), y.cpu()) for x, y in loader]


@pytest.mark.parametrize("rotation", [0.0, 10.0])
def test_device_loader_gives_the_cpus_pixels(rotation):
    """Same images, seed and epoch: the same batches on CUDA as on the CPU, across several of the
    GPU's epoch chunks and a partial last batch. Without rotation every pixel is equal; with it, a
    pixel centre that lands exactly on a pixel border may round the other way (allowed: 0.1%)."""
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (600,), generator=rng).numpy()
    images = synthetic_images(labels, np.random.default_rng(0))
    cpu, gpu = _batches(images, labels, CPU, rotation), _batches(images, labels, CUDA, rotation)
    assert [len(y) for _, y in gpu] == [len(y) for _, y in cpu] == [64] * 9 + [24]
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert torch.equal(yc, yg)
        same = torch.isclose(xc, xg, atol=1e-5).all(1)
        if rotation:
            assert same.float().mean() > 0.999
        else:
            assert same.all()


def test_policy_workers_on_cuda_give_the_batches_of_the_policy_in_line():
    """The --augment policy in worker processes (an epoch ahead) hands the GPU the same
    batches as the policy in line, over two epochs, across the GPU's epoch chunks."""
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (600,), generator=rng).numpy()
    images = synthetic_images(labels, np.random.default_rng(0))
    batches = {}
    for workers in (0, 2):
        loader = data.DeviceLoader(images, labels, 64, seed=0, device=CUDA, epoch_chunk=256, cutout=8,
                                   policy="trivialaugment", policy_workers=workers)
        batches[workers] = []
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            batches[workers] += [x.cpu() for x, _ in loader]
        loader.close()
    assert len(batches[0]) == 20
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def _model_and_batch(seed=0, n=64):
    torch.manual_seed(seed)
    model = resnet9().to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(n, 3, 32, 32, device=CUDA)
    y = torch.randint(0, 10, (n,), device=CUDA)
    return model, x, y


def test_bf16_step_is_finite_and_close_to_fp32():
    """The same batch and weights: bf16 autocast's loss is within 2% of fp32's (measured: ~0.1%),
    and one SGD step on each lowers the loss on that batch."""
    losses = {}
    for amp in (False, True):
        model, x, y = _model_and_batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
        step = EagerStep(model, optimizer, F.cross_entropy, device=CUDA, amp=amp, channels_last=True)
        model.train()
        first, _ = step(x, y)
        for _ in range(3):
            last, _ = step(x, y)
        losses[amp] = (first.item(), last.item())
        assert all(torch.isfinite(torch.tensor(losses[amp])))
        assert losses[amp][1] < losses[amp][0]
    assert abs(losses[True][0] - losses[False][0]) < 0.02 * losses[False][0]


def test_fused_sgd_on_cuda_matches_the_cpu():
    """Three fused SGD steps with momentum from the same weights and gradients: the same weights on
    both devices up to float rounding (rtol 1e-5)."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in ((64, 3, 3, 3), (512,), (10, 512))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    results = {}
    for device in (CPU, CUDA):
        ps = [p.clone().to(device).requires_grad_() for p in params]
        opt = torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True, fused=True)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.to(device)
            opt.step()
        results[device.type] = [p.detach().cpu() for p in ps]
    for a, b in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _run_steps(step, batches):
    return [step(x, y)[0].item() for x, y in batches]


def test_cuda_graph_step_trains_as_eager_steps_do():
    """Eight steps eagerly and through a CUDA graph (2 warm-up steps, capture on the third, a
    partial batch in the middle, which runs eagerly): the same losses and weights up to cuDNN's
    float reordering, and the graph was captured and replayed. Weights loaded into the model after
    capture (the best-weights reload) are the weights the graph trains."""
    torch.backends.cudnn.deterministic = True
    try:
        gen = torch.Generator(device=CUDA).manual_seed(1)
        sizes = [64, 64, 64, 64, 40, 64, 64, 64]
        batches = [(torch.randn(n, 3, 32, 32, device=CUDA, generator=gen),
                    torch.randint(0, 10, (n,), device=CUDA, generator=gen)) for n in sizes]
        runs = {}
        for graphed in (False, True):
            model, _, _ = _model_and_batch()
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, fused=True)
            kwargs = {"device": CUDA, "amp": True, "channels_last": True}
            step = (CudaGraphStep(model, opt, F.cross_entropy, batch_size=64, warmup=2, **kwargs) if graphed
                    else EagerStep(model, opt, F.cross_entropy, **kwargs))
            runs[graphed] = (_run_steps(step, batches), model, step)
        (eager_losses, eager_model, _), (graph_losses, graph_model, graph_step) = runs[False], runs[True]
        assert graph_step.graph is not None and graph_step.failed is None
        assert graph_step.replays == 5 and graph_step.eager_steps == 3
        assert graph_losses == pytest.approx(eager_losses, rel=2e-2)
        initial = _model_and_batch()[0].state_dict()["conv1.weight"]
        assert not torch.equal(graph_model.state_dict()["conv1.weight"], initial)  # the replays did train
        for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values(), strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3, msg=name)

        # A reload after capture: both models get the same weights, then take the same step.
        graph_model.load_state_dict(eager_model.state_dict())
        x, y = batches[0]
        eager_next = EagerStep(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.0), F.cross_entropy,
                               device=CUDA, amp=True, channels_last=True)(x, y)[0].item()
        graph_next = graph_step(x, y)[0].item()
        assert graph_next == pytest.approx(eager_next, rel=1e-2)
    finally:
        torch.backends.cudnn.deterministic = False


def test_train_py_one_epoch_writes_everything_and_evaluates(cuda_data, tmp_path, capsys):
    """train.py on CUDA (bf16, channels-last, CUDA graph): one epoch of 1,900 images writes the
    best and last checkpoints, the history and both plots; evaluate.py reads the best on CUDA and,
    the checkpoint written on CUDA, on the CPU too, with the same accuracy up to bf16 rounding."""
    out = tmp_path / "run"
    assert train.main(_args(cuda_data, out)) == 0
    text = capsys.readouterr().out
    assert "device cuda" in text and "amp True" in text and "cuda_graph True" in text
    assert {p.name for p in out.iterdir()} >= OUTPUTS
    best = load_checkpoint(out / train.BEST_NAME)
    assert all(t.device.type == "cpu" for t in best["model"].values())
    accuracies = {}
    for device in ("cuda", "cpu"):
        eval_out = tmp_path / f"eval-{device}"
        assert evaluate.main([str(out / train.BEST_NAME), "--data-dir", str(cuda_data), "--out-dir", str(eval_out),
                              "--device", device, "--no-robustness"]) == 0
        accuracies[device] = json.loads((eval_out / "report.json").read_text())["accuracy"]
    assert abs(accuracies["cuda"] - accuracies["cpu"]) <= 1.0  # 200 images: two may flip under bf16


def test_deterministic_runs_write_identical_checkpoints(cuda_data, tmp_path):
    """--deterministic twice on CUDA (CUDA graph included), each in a fresh process as a user runs
    it (cuBLAS reads its workspace setting when it starts): bit-identical weights and momentum."""
    states = []
    for name in ("a", "b"):
        cmd = [sys.executable, str(ROOT / "train.py"), *_args(cuda_data, tmp_path / name, "--deterministic",
                                                               "--subset", "1000")]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "cuda_graph True" in result.stdout
        states.append(load_checkpoint(tmp_path / name / train.LAST_NAME))
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    for a, b in zip(states[0]["optimizer"]["state"].values(), states[1]["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_sigterm_mid_epoch_with_a_cuda_graph_saves_and_resumes(cuda_data, tmp_path, monkeypatch, capsys):
    """SIGTERM inside a graphed epoch (after 10 steps, the graph replaying): the position is saved;
    the resumed run records its own graph, finishes the epoch, and ends with a full epoch's count."""
    calls = {"n": 0}
    real_call = CudaGraphStep.__call__

    def sigterm_at_ten(self, x, y):
        calls["n"] += 1
        if calls["n"] == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, x, y)

    monkeypatch.setattr(CudaGraphStep, "__call__", sigterm_at_ten)
    out = tmp_path / "run"
    assert train.main(_args(cuda_data, out)) == 128 + signal.SIGTERM
    progress = load_checkpoint(out / train.LAST_NAME)["progress"]
    assert progress["epoch"] == 0 and progress["step"] == 10
    monkeypatch.undo()
    assert train.main(["--resume", str(out / train.LAST_NAME)]) == 0
    assert "cuda_graph True" in capsys.readouterr().out
    history = load_checkpoint(out / train.LAST_NAME)["progress"]["history"]
    assert [h["epoch"] for h in history] == [1]


def test_torchrun_one_process_trains_an_epoch_with_nccl(cuda_data, tmp_path):
    """torchrun --nproc_per_node=1: a process group on NCCL, DDP, one epoch, one set of outputs."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train.py"), *_args(cuda_data, out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 process(es)" in result.stdout and "cuda_graph False" in result.stdout
    assert {p.name for p in out.iterdir()} >= OUTPUTS
    assert torch.distributed.is_nccl_available()


def test_compile_runs_without_falling_back(capsys):
    """torch.compile on CUDA compiles the training forward and backward (no eager fallback, no
    graph break) and computes what eager computes (fp32 logits of about 1: atol 1e-3). Last in this
    file: a compile takes the longest."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, x, y = _model_and_batch(n=32)
    model.train()
    expected = model(x).detach()
    compiled = compile_model(model, CUDA)
    assert compiled is not model and "warning" not in capsys.readouterr().err
    got = compiled(x)
    torch.testing.assert_close(got.detach(), expected, atol=1e-3, rtol=1e-3)
    F.cross_entropy(got, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_weight_average_trains_eagerly_on_cuda(cuda_data, tmp_path):
    """--ema on CUDA: the step stays eager (auto), the average counts one update per step and lags
    the trained weights; --cuda-graph with --ema is refused in one line."""
    cmd = [sys.executable, str(ROOT / "train.py"),
           *_args(cuda_data, tmp_path / "ema", "--subset", "1000", "--ema", "0.9", "--ema-every", "1")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cuda_graph False" in result.stdout and "ema 0.9 every 1 steps" in result.stdout
    last = load_checkpoint(tmp_path / "ema" / train.LAST_NAME)
    assert last["ema"]["updates"] == 16  # 1,000 images in steps of 64
    assert not torch.equal(last["ema"]["model"]["linear.weight"], last["model"]["linear.weight"])
    refused = subprocess.run([*cmd, "--cuda-graph", "--out", str(tmp_path / "graph")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--cuda-graph: the weight average" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_best_recipe_trains_on_cuda_with_its_policy_in_workers(cuda_data, tmp_path):
    """--recipe best on CUDA, as a user runs it (its own process): TrivialAugment in the automatic
    number of worker processes, in the CUDA graph; the test set evaluated once, at the end, with TTA."""
    cmd = [sys.executable, str(ROOT / "train.py"), *_args(cuda_data, tmp_path / "best", "--recipe", "best",
                                                           "--val-size", "0")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert "trivialaugment in " in first and "worker(s)" in first and "cuda_graph True" in first
    history = load_checkpoint(tmp_path / "best" / train.BEST_NAME)["history"]
    assert len(history) == 1 and history[0]["val_acc"] is not None
