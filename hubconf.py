"""torch.hub entry point: the paper's ResNet9, with the weights this repository ships.

From a clone of this repository:

    import torch
    model = torch.hub.load("path/to/this/repo", "resnet9", source="local", pretrained=True)

From GitHub (torch.hub downloads the repository, the shipped checkpoint included, into
~/.cache/torch/hub; OWNER/REPO is where this repository is published, a branch after a colon):

    model = torch.hub.load("OWNER/REPO", "resnet9", pretrained=True, trust_repo=True)
    model = torch.hub.load("OWNER/REPO:main", "resnet9", pretrained=True, trust_repo=True)

Two sets of weights ship: `resnet9` has the paper's recipe (model/learn_rate_consistent_model.pth),
`resnet9_best` the same network trained with `--recipe best` (model/resnet9_best.pth;
docs/results.md):

    model = torch.hub.load("path/to/this/repo", "resnet9_best", source="local")
    model = torch.hub.load("path/to/this/repo", "resnet9_best_int8", source="local")  # onnxruntime, int8

`resnet9_best_int8` is that model exported by `export.py --int8` (model/resnet9_best-int8.onnx),
run by onnxruntime on the CPU behind the same module interface (it needs requirements-optional.txt).

The model comes back in eval mode and expects float32 N x 3 x 32 x 32 RGB images scaled to [0, 1]
and normalised with the CIFAR-10 mean and std (data.py: CIFAR10_MEAN, CIFAR10_STD); its 10 outputs
are logits in the order of data.CLASSES. docs/export.md shows a whole example.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

dependencies = ["torch"]  # what torch.hub checks before loading this file

MODEL_DIR = Path(__file__).resolve().parent / "model"
SHIPPED_WEIGHTS = MODEL_DIR / "learn_rate_consistent_model.pth"  # the paper's recipe
BEST_WEIGHTS = MODEL_DIR / "resnet9_best.pth"  # `train.py --recipe best`
BEST_INT8 = MODEL_DIR / "resnet9_best-int8.onnx"  # that checkpoint through `export.py --int8`


def resnet9(pretrained: bool = False, weights: str | None = None, num_classes: int = 10,
            activation: str = "relu") -> nn.Module:
    """ResNet9 (4,903,242 parameters for 10 classes). pretrained=True: the shipped weights (or the
    checkpoint or .safetensors file named by `weights`), in eval mode; pretrained=False: freshly
    initialised for `num_classes` (and `activation`: model.ACTIVATIONS), in train mode; a checkpoint
    brings its own activation. Raises checkpoint.CheckpointError (one line, naming
    the file) when the weights are missing or damaged."""
    from model import resnet9 as build

    if not pretrained:
        if weights is not None:
            raise ValueError("weights= is for pretrained=True; pretrained=False builds a fresh model")
        return build(num_classes, activation)
    return _pretrained(Path(weights) if weights is not None else SHIPPED_WEIGHTS, num_classes)


def resnet9_best() -> nn.Module:
    """The same ResNet9 (4,903,242 parameters, ReLU) trained with `python train.py --recipe best`:
    the shipped model/resnet9_best.pth, in eval mode. Its inputs and outputs are resnet9's; its
    accuracy and the run that made it are in docs/results.md."""
    return _pretrained(BEST_WEIGHTS, 10)


def resnet9_best_int8() -> nn.Module:
    """resnet9_best quantised to int8 (model/resnet9_best-int8.onnx, docs/export.md, "int8"), run
    with onnxruntime on the CPU: the same inputs and outputs as resnet9_best, no gradients. Raises
    deploy.onnx_model.OnnxError (one line) when the file or onnxruntime is missing."""
    from deploy.onnx_model import OnnxClassifier

    return OnnxClassifier(BEST_INT8).eval()


def _pretrained(path: Path, num_classes: int) -> nn.Module:
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(path), path)
    if model.linear.out_features != num_classes:
        raise ValueError(f"{path} holds a model for {model.linear.out_features} classes, not num_classes={num_classes}")
    return model.eval()
