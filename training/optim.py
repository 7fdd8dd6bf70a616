"""The optimizer of a run: SGD (the paper's) or AdamW, and its parameter groups.

One group holds every parameter, unless BatchNorm's are treated apart (--bn-bias-lr-scale,
--bn-freeze-weight). Each group may carry an `lr_scale`, which train.py's schedule multiplies the
scheduled learning rate by.
"""
from __future__ import annotations

import torch
from torch import nn

from training.config import TrainConfig, UsageError


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """The optimizer's parameter groups: one, unless BatchNorm's parameters are treated apart
    (--bn-bias-lr-scale, --bn-freeze-weight). Then group 0 holds every other parameter, and each
    group's `lr_scale` multiplies the scheduled learning rate. The biases' weight decay is divided
    by their scale, so that the decay per step (lr x decay) stays the same."""
    if cfg.bn_bias_lr_scale == 1 and not cfg.bn_freeze_weight:
        return [{"params": list(model.parameters())}]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weights, biases = [m.weight for m in norms], [m.bias for m in norms]
    special = {id(p) for p in weights + biases}
    scale = cfg.bn_bias_lr_scale
    return [{"params": [p for p in model.parameters() if id(p) not in special], "lr_scale": 1.0},
            {"params": biases, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": cfg.weight_decay / scale},
            {"params": weights, "lr": 0.0 if cfg.bn_freeze_weight else cfg.lr,
             "lr_scale": 0.0 if cfg.bn_freeze_weight else 1.0}]  # lr 0: kept at their initial 1


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW, as --optimizer says; fused where PyTorch has the fused kernel."""
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "adamw":
        if cfg.nesterov:
            raise UsageError("--nesterov is SGD's; AdamW has no Nesterov momentum: add --no-nesterov "
                             "(the fast recipe turns it on)")
        # capturable: the step counter stays on the GPU, so the step can be recorded as a CUDA graph
        return torch.optim.AdamW(param_groups(cfg, model), lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                 weight_decay=cfg.weight_decay, fused=fused, capturable=bool(cfg.cuda_graph))
    return torch.optim.SGD(param_groups(cfg, model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, fused=fused)
