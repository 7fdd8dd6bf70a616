"""The device loader: the whole training split held on the training device as uint8, and the
paper's augmentation (crop, flip, rotation; cutout with --cutout) done there for a batch in one
gather. Written by hand, not with torchvision.transforms.v2: a v2 transform called on a batch
draws one set of parameters for all of it, so per-image draws take one call per image on the
host, which is the torchvision loader's path: 1,614 images/s on 2 EPYC cores against 35,641 for
this gather (docs/speed.md).

Each image's parameters come from a generator seeded by (seed, epoch), indexed by the image, so
an epoch is the same whatever the number of processes; the pixels are those of the PIL pipeline
(tests/test_augment.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data import PAD, EpochBatches, EpochSampler, mix_seed, normalize_batch, policy_transform, to_device_images
from training.policy_workers import PolicyEpochs, apply_policy, policy_seeds

EPOCH_CHUNK = 8192  # about this many images augmented per launch by the device loader on a GPU
FLIPS = ("random", "alternate")  # --flip: each epoch's own coin per image, or the other side each epoch


def augment_params(n: int, generator: torch.Generator, rotation: float = 10.0,
                   cutout: int = 0) -> dict[str, torch.Tensor]:
    """Random parameters for n images, drawn as torchvision's transforms draw them: crop offsets
    uniform in 0..2*PAD, a flip with probability 1/2, an angle uniform in [-rotation, rotation].
    With `cutout`, also the centre of each image's blanked square, uniform over the image; drawn
    last, so that the other draws are the same with and without it."""
    params = {
        "top": torch.randint(0, 2 * PAD + 1, (n,), generator=generator),
        "left": torch.randint(0, 2 * PAD + 1, (n,), generator=generator),
        "flip": torch.rand(n, generator=generator) < 0.5,
        "angle": (torch.rand(n, generator=generator) * 2 - 1) * rotation,
    }
    if cutout:
        params["cut_y"] = torch.randint(0, 32, (n,), generator=generator)
        params["cut_x"] = torch.randint(0, 32, (n,), generator=generator)
    return params


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """--flip alternate: each image is flipped or not at random in the first epoch and the other way
    in each epoch after, so that any two epochs in a row show it both ways (airbench's derandomised
    flips: random flips show an image the same way two epochs running half the time)."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(mix_seed(seed, 2))) < 0.5
    return first ^ bool((epoch - 1) % 2)


def augment_batch(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                  angle: torch.Tensor, cut_y: torch.Tensor | None = None, cut_x: torch.Tensor | None = None,
                  cutout: int = 0) -> torch.Tensor:
    """The paper's augmentation for a whole uint8 batch in one gather, with per-image parameters.

    For each output pixel it finds the source pixel the PIL pipeline would read: undo the rotation
    about the image centre (nearest neighbour: PIL takes the floor of the source coordinate of the
    pixel centre), undo the flip, undo the crop of the zero-padded image. Pixels that come from
    outside the rotated window or from the padding are zero, as PIL fills them.

    With `cutout` (pixels), a cutout x cutout square centred on (cut_y, cut_x) of the output is
    zeroed as well (clipped at the border): DeVries & Taylor's cutout, filled like the padding."""
    b, c, h, w = images.shape
    dev = images.device
    theta = torch.deg2rad(angle.to(dev, torch.float32)).view(b, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    v = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5 - h / 2).view(1, h, 1)
    u = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5 - w / 2).view(1, 1, w)
    qx = torch.floor(cos * u - sin * v + w / 2).long()  # source pixel in the rotated (cropped, flipped) image
    qy = torch.floor(sin * u + cos * v + h / 2).long()
    inside = (qx >= 0) & (qx < w) & (qy >= 0) & (qy < h)
    qx = torch.where(flip.to(dev).view(b, 1, 1), w - 1 - qx, qx)  # undo the flip
    sx = qx + left.to(dev).view(b, 1, 1) - PAD  # undo the crop of the padded image
    sy = qy + top.to(dev).view(b, 1, 1) - PAD
    inside &= (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    if cutout:
        y0 = (cut_y.to(dev) - cutout // 2).view(b, 1, 1)
        x0 = (cut_x.to(dev) - cutout // 2).view(b, 1, 1)
        rows, cols = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        inside &= ~((rows >= y0) & (rows < y0 + cutout) & (cols >= x0) & (cols < x0 + cutout))
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = images.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out * inside.unsqueeze(1).to(out.dtype)


def augmented_examples(images: np.ndarray, seed: int, rotation: float = 10.0, n: int = 64,
                       cutout: int = 0, policy: str = "none") -> torch.Tensor:
    """The first n training images as DeviceLoader augments them in epoch 1 (uint8 n x 3 x 32 x 32, on
    the CPU): the same per-image parameters, drawn for every image and indexed by it; for showing."""
    generator = torch.Generator().manual_seed(mix_seed(seed, 1))
    params = augment_params(len(images), generator, rotation, cutout)
    x = to_device_images(images[:n], torch.device("cpu"))
    transform = policy_transform(policy)
    if transform is not None:
        x = apply_policy(x, policy_seeds(seed, 1, list(range(len(x)))), transform)
    return augment_batch(x, **{k: v[:n] for k, v in params.items()}, cutout=cutout)


class DeviceLoader(EpochBatches):
    """The whole training split held on the training device as uint8, augmented there batch by batch.

    Same order of images as TorchvisionLoader; each image's random parameters come from a generator
    seeded by (seed, epoch), indexed by the image, so they do not depend on the number of processes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, rotation: float = 10.0,
                 epoch_chunk: int | None = None, cutout: int = 0, policy: str = "none", flip: str = "random",
                 policy_workers: int = 0) -> None:
        self.batch_size, self.rotation, self.cutout, self.device = batch_size, rotation, cutout, device
        if flip not in FLIPS:
            raise ValueError(f"unknown flip {flip!r}; known: {', '.join(FLIPS)}")
        self.alternate_flips = flip == "alternate"
        self.policy = policy_transform(policy)
        # On a GPU the epoch is augmented up front in a few large launches (50,000 images are 600 MB
        # as float32): at batch 64, launching the augmentation's kernels per batch would cost more
        # time than the step itself. On the CPU batch by batch: the same pixels, less memory.
        if epoch_chunk is None:
            epoch_chunk = EPOCH_CHUNK if device.type == "cuda" else batch_size
        self.epoch_chunk = epoch_chunk
        self.images = to_device_images(images, device)
        # The policy's operations run image by image on the CPU (a GPU would wait on thousands of
        # tiny launches), from a host copy; on the CPU that copy is the same tensor.
        self.host_images = self.images if device.type == "cpu" or self.policy is None else \
            to_device_images(images, torch.device("cpu"))
        # policy_workers > 0: the policy of a whole epoch, in that many processes, an epoch ahead.
        self.policy_epochs = None
        if self.policy is not None and policy_workers > 0:
            self.policy_epochs = PolicyEpochs(self.host_images, seed, policy, policy_workers)
        self._epoch_images: torch.Tensor | None = None
        self.labels = torch.from_numpy(labels).to(device)
        self.sampler = EpochSampler(len(images), seed, rank, world_size)

    def _source(self, idx: torch.Tensor) -> torch.Tensor:
        """The images `idx` before the crop, flip and cutout: with the policy applied, if any."""
        if self.policy is None:
            return self.images[idx]
        if self._epoch_images is not None:
            return self._epoch_images[idx]
        cpu_idx = idx.cpu()
        seeds = policy_seeds(self.sampler.seed, self.sampler.epoch, cpu_idx.tolist())
        return apply_policy(self.host_images[cpu_idx], seeds, self.policy).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._sized(self._batches())

    def close(self) -> None:
        """Stop the policy's worker processes, if any."""
        if self.policy_epochs is not None:
            self.policy_epochs.close()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(self.sampler.indices(), dtype=torch.long).to(self.device)
        if self.policy_epochs is not None:
            self._epoch_images = self.policy_epochs.epoch(self.sampler.epoch).to(self.device, non_blocking=True)
        generator = torch.Generator().manual_seed(mix_seed(self.sampler.seed, self.sampler.epoch))
        params = augment_params(len(self.images), generator, self.rotation, self.cutout)
        if self.alternate_flips:
            params["flip"] = alternating_flips(len(self.images), self.sampler.seed, self.sampler.epoch)
        params = {k: v.to(self.device) for k, v in params.items()}
        chunk = max(1, self.epoch_chunk // self.batch_size) * self.batch_size  # whole batches per launch
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            x = normalize_batch(augment_batch(self._source(idx), **{k: v[idx] for k, v in params.items()},
                                              cutout=self.cutout))
            y = self.labels[idx]
            for i in range(0, len(idx), self.batch_size):
                yield x[i:i + self.batch_size], y[i:i + self.batch_size]
