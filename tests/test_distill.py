"""Knowledge distillation (training/distill.py, train.py --teacher): the loss is the formula, the teachers see
the student's batch in eval mode under its autocast, several average, and a teacher is recorded,
checked on resume and refused in one line where it cannot teach."""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from conftest import ROOT, tiny_train_args
from model import resnet9
from training.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from training.config import TrainConfig, UsageError
from training.distill import DistillationLoss, load_teachers, soft_target_loss
from training.run import platform_defaults
from training.step import EagerStep

CPU = torch.device("cpu")


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert all(n in err for n in needles), err


class FixedLogits(nn.Module):
    """A teacher that answers these logits whatever it is shown, and remembers what it was shown."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.seen = logits, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.logits


def test_the_loss_is_the_formula_on_a_fixed_batch_with_two_teachers_averaged():
    torch.manual_seed(0)
    student, y, x = torch.randn(8, 10) * 2, torch.randint(0, 10, (8,)), torch.randn(8, 3, 32, 32)
    t1, t2 = torch.randn(8, 10) * 3, torch.randn(8, 10)
    weight, temperature, smoothing = 0.7, 3.0, 0.1
    teachers = [FixedLogits(t1), FixedLogits(t2)]
    loss = DistillationLoss(functools.partial(F.cross_entropy, label_smoothing=smoothing), teachers, weight,
                            temperature)(student, y, x)
    # by hand: the teachers' mean logits, softmax at T as the target; the student's log-softmax at T
    target = torch.exp((t1 + t2) / 2 / temperature)
    target = target / target.sum(1, keepdim=True)
    log_q = student / temperature - torch.logsumexp(student / temperature, 1, keepdim=True)
    kl = (target * (target.log() - log_q)).sum(1).mean()
    log_p = student - torch.logsumexp(student, 1, keepdim=True)
    ce = ((1 - smoothing) * -log_p[torch.arange(8), y] + smoothing * -log_p.mean(1)).mean()
    expected = (1 - weight) * ce + weight * temperature ** 2 * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert all(t.seen is x for t in teachers)
    one = DistillationLoss(F.cross_entropy, [FixedLogits(t1)], weight, temperature)(student, y, x)
    assert not torch.allclose(one, loss)  # the second teacher counts
    assert soft_target_loss(t1, t1, temperature).abs() < 1e-6  # no divergence from itself


@pytest.mark.parametrize("amp", [False, True])
def test_the_step_shows_the_teacher_the_students_batch_in_eval_mode_under_its_autocast(amp):
    torch.manual_seed(1)
    student, teacher = resnet9(), resnet9().eval()
    teacher.requires_grad_(False)
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}
    student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", (i[0], o.dtype)))
    teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", (i[0], o.dtype, m.training)))
    loss_fn = DistillationLoss(F.cross_entropy, [teacher], 0.5, 4.0)
    step = EagerStep(student, torch.optim.SGD(student.parameters(), lr=0.1), loss_fn, device=CPU, amp=amp,
                     channels_last=True)
    student.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    loss, logits = step(x, y)
    assert seen["teacher"][0] is seen["student"][0]  # the same (augmented, channels-last) batch
    assert seen["teacher"][1] == seen["student"][1] == (torch.bfloat16 if amp else torch.float32)
    assert seen["teacher"][2] is False  # eval mode: its BatchNorm uses its own statistics
    assert all(torch.equal(v, stats[k]) for k, v in teacher.state_dict().items())  # and never updates them
    assert all(p.grad is None for p in teacher.parameters())
    if not amp:  # the step's loss is the formula on the logits it returns
        with torch.no_grad():
            expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * soft_target_loss(logits, teacher(x), 4.0)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_records_its_teachers_by_path_and_sha256_and_resume_checks_the_file(trained_run, tiny_cifar, tmp_path,
                                                                                  capsys):
    teacher = tmp_path / "teacher.pth"
    shutil.copy(trained_run / train.BEST_NAME, teacher)
    out = tmp_path / "student"
    args = tiny_train_args(tiny_cifar, out, "--epochs", "1", "--teacher", str(teacher), "--teacher", str(teacher),
                           "--kd-weight", "0.9", "--kd-temperature", "2")
    assert train.main(args) == 0
    assert "distilling from 2 teacher(s) at --kd-weight 0.9 --kd-temperature 2" in capsys.readouterr().out
    last = load_checkpoint(out / train.LAST_NAME)
    cfg = last["config"]
    assert cfg["teacher"] == [str(teacher)] * 2 and cfg["teacher_sha256"] == [file_sha256(teacher)] * 2
    assert (cfg["kd_weight"], cfg["kd_temperature"]) == (0.9, 2.0)
    assert load_checkpoint(out / train.BEST_NAME)["config"]["teacher_sha256"] == cfg["teacher_sha256"]

    original = teacher.read_bytes()
    changed = load_checkpoint(teacher)
    changed["model"]["linear.bias"] = changed["model"]["linear.bias"] + 1  # another teacher, as loadable
    save_checkpoint(changed, teacher)
    resume = ["--resume", str(out / train.LAST_NAME), "--epochs", "2", "--device", "cpu", "--workers", "0"]
    _one_line(train.main(resume), capsys.readouterr().err, f"--teacher {teacher}", "SHA-256", "changed")
    assert load_checkpoint(out / train.LAST_NAME)["epoch"] == 1  # nothing trained
    teacher.write_bytes(original)
    assert train.main(resume) == 0  # the same file again: the run goes on with it
    assert load_checkpoint(out / train.LAST_NAME)["epoch"] == 2


def test_a_teacher_of_another_class_count_or_a_missing_one_is_one_line(trained_run, tiny_cifar, tmp_path, capsys):
    teacher = str(trained_run / train.BEST_NAME)  # 10 classes
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "a", "--num-classes", "12", "--teacher", teacher))
    _one_line(code, capsys.readouterr().err, "10 classes", "the student 12")
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "b", "--teacher", str(tmp_path / "none.pth")))
    _one_line(code, capsys.readouterr().err, "none.pth", "cannot read")
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "c", "--kd-weight", "0.3"))
    _one_line(code, capsys.readouterr().err, "--kd-weight is for distillation", "--teacher")
    code = train.main(tiny_train_args(tiny_cifar, tmp_path / "d", "--teacher", teacher, "--teacher-sha256", "0" * 64))
    _one_line(code, capsys.readouterr().err, "SHA-256", "0" * 64)
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")


def test_load_teachers_checks_the_digests_it_is_given(trained_run):
    path = str(trained_run / train.BEST_NAME)
    cfg, teachers = load_teachers(TrainConfig(teacher=[path], channels_last=False), CPU)
    assert cfg.teacher_sha256 == [file_sha256(path)] and len(teachers) == 1 and not teachers[0].training
    assert load_teachers(cfg, CPU)[0] == cfg  # a resumed config: checked, the same
    with pytest.raises(UsageError, match="2 --teacher-sha256"):
        load_teachers(TrainConfig(teacher=[path], teacher_sha256=cfg.teacher_sha256 * 2), CPU)


def test_the_cuda_graph_is_refused_with_a_teacher():
    cfg = TrainConfig(teacher=["t.pth"])
    assert platform_defaults(cfg, torch.device("cuda")).cuda_graph is False  # the default: eager steps
    with pytest.raises(UsageError, match="--cuda-graph: a teacher's forward"):
        platform_defaults(TrainConfig(teacher=["t.pth"], cuda_graph=True), torch.device("cuda"))


@pytest.mark.slow
def test_two_processes_distil_as_one(trained_run, tiny_cifar, tmp_path):
    """Under torchrun each process shows the teacher its share of the batch: one step of global
    batch 32 over 2 processes (SyncBatchNorm) moves the weights as one process does."""
    flags = ("--epochs", "1", "--subset", "32", "--batch-size", "32", "--sync-bn", "--val-size", "20", "--no-amp",
             "--teacher", str(trained_run / train.BEST_NAME), "--device", "cpu")
    assert train.main(["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "one"), "--workers", "0", *flags]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "two"), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (load_checkpoint(tmp_path / name / train.LAST_NAME) for name in ("one", "two"))
    assert two["config"]["teacher_sha256"] == one["config"]["teacher_sha256"]
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_prune_fine_tunes_with_the_parent_as_teacher(trained_run, tiny_cifar, tmp_path):
    pytest.importorskip("torch_pruning")
    import prune
    parent = str(trained_run / train.BEST_NAME)
    out = tmp_path / "pruned.pth"
    assert prune.main([parent, "--flops", "0.5", "--finetune-epochs", "1", "--out", str(out), "--data-dir",
                       str(tiny_cifar), "--val-size", "20", "--workers", "0", "--device", "cpu", "--no-amp",
                       "--teacher", parent]) == 0
    cfg = load_checkpoint(out)["config"]
    assert cfg["teacher"] == [parent] and cfg["teacher_sha256"] == [file_sha256(parent)]
    assert cfg["widths"] != [] and load_checkpoint(out)["pruning"]["parent_sha256"] == file_sha256(parent)
