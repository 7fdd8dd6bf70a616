"""Knowledge distillation: `train.py --teacher CKPT [--teacher CKPT ...] --kd-weight A --kd-temperature T`.

The student trains on

    (1 - A) * CE(student, labels) + A * T**2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015): the KL divergence
takes the teacher's distribution as the target, and T**2 keeps the size of that term's gradients
as T changes; CE is the run's own cross-entropy (its --label-smoothing included). The teachers'
logits are computed on the same augmented batch as the student's, in eval mode (their BatchNorm
statistics stay as trained), under the step's autocast and without gradients; several teachers
average their logits. A teacher is any checkpoint this project writes (a pruned one, a
.safetensors export), rebuilt from its own config, with as many classes as the student. The
student's config records each teacher by path and SHA-256 of the file; --resume checks that the
file is still the same. The step (step.py) hands the batch to a loss with `takes_inputs`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from training.config import TrainConfig, UsageError

KD_FLAGS = ("kd_weight", "kd_temperature")  # the fields that mean something with a teacher only


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T**2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over the batch, in float32."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * t * t


class DistillationLoss:
    """loss_fn(logits, y, x) for the step: the run's cross-entropy mixed with the soft-target term of
    the teachers' mean logits on the same batch `x`."""

    takes_inputs = True  # the step calls it with the batch too

    def __init__(self, cross_entropy: Callable, teachers: list[nn.Module], weight: float, temperature: float) -> None:
        self.cross_entropy, self.teachers = cross_entropy, teachers
        self.weight, self.temperature = weight, temperature

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the teachers' logits (float32), under whatever autocast the caller is in."""
        return torch.stack([teacher(x).float() for teacher in self.teachers]).mean(0)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        soft = soft_target_loss(logits, self.teacher_logits(x), self.temperature)
        return (1 - self.weight) * self.cross_entropy(logits, y) + self.weight * soft


def load_teachers(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, list[nn.Module]]:
    """The run's teachers, on `device` in eval mode, and the config with their files' SHA-256
    (computed where it records none, checked where it does: a resumed run, --teacher-sha256)."""
    if not cfg.teacher:
        defaults = TrainConfig()
        changed = [k for k in (*KD_FLAGS, "teacher_sha256") if getattr(cfg, k) != getattr(defaults, k)]
        if changed:
            raise UsageError(f"--{changed[0].replace('_', '-')} is for distillation: add --teacher CKPT, "
                             "or leave it out")
        return cfg, []
    if cfg.teacher_sha256 and len(cfg.teacher_sha256) != len(cfg.teacher):
        raise UsageError(f"{len(cfg.teacher)} --teacher file(s) but {len(cfg.teacher_sha256)} --teacher-sha256; "
                         "give one digest per teacher, in order, or none")
    digests, teachers = [], []
    for i, path in enumerate(cfg.teacher):
        digest = file_sha256(path)
        if cfg.teacher_sha256 and digest != cfg.teacher_sha256[i]:
            raise UsageError(f"--teacher {path}: its SHA-256 is {digest}, not the {cfg.teacher_sha256[i]} the run "
                             "records for it: the file changed, or is another one; put that file back there")
        model = model_from_checkpoint(load_checkpoint(path), path)
        classes = model.linear.out_features
        if classes != cfg.num_classes:
            raise UsageError(f"--teacher {path}: its model has {classes} classes, the student {cfg.num_classes} "
                             "(--num-classes); a teacher must have the student's classes")
        model = model.to(device).eval().requires_grad_(False)
        teachers.append(model.to(memory_format=torch.channels_last) if cfg.channels_last else model)
        digests.append(digest)
    return dataclasses.replace(cfg, teacher_sha256=digests), teachers


def training_loss(cross_entropy: Callable, teachers: list[nn.Module], cfg: TrainConfig) -> Callable:
    """The step's loss: the cross-entropy alone, or mixed with the teachers' soft targets."""
    if not teachers:
        return cross_entropy
    return DistillationLoss(cross_entropy, teachers, cfg.kd_weight, cfg.kd_temperature)
