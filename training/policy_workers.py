"""The --augment policy for whole epochs, in DataLoader worker processes, an epoch ahead of training.

The device loader draws TrivialAugment per image (apply_policy below: one of 14 operations at a
random strength, seeded by (run seed, epoch, image)), one image at a time on the CPU: 0.1-0.4 ms
an image, 4-16 s an epoch of 40,000 on one core. On a GPU an epoch of training takes under a
second, so done in line the policy would be nearly all of a run's time (7-27 min of the 100
epochs of `--recipe best` on one core). Here torch's DataLoader spreads it over worker processes: the
training set is cut into chunks, a worker applies the policy to one chunk of one epoch, and the
loader's prefetching keeps the workers an epoch or more ahead of the training loop. Each image is
still seeded by its own (seed, epoch, index), so the pixels are the same whatever the number of
workers, and the same as in line (tests/test_best_recipe.py).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from data import mix_seed, policy_transform
from training.runtime import available_cpus

CHUNK = 1000  # images a worker augments per task: large enough that handing it back costs little


def apply_policy(images: torch.Tensor, seeds: list[int], policy: v2.Transform) -> torch.Tensor:
    """`policy` applied to each uint8 3 x 32 x 32 image (on the CPU) with its random draws seeded by
    its own seed, so that an image's augmentation depends on nothing but (run seed, epoch, index).
    One image at a time, as TrivialAugment draws per image: 0.1-0.4 ms each on one core (4-16 s per
    epoch of 40,000 images; policy_workers.py spreads it over processes on a GPU machine);
    torchvision's batched call would give a whole batch the same operation.
    The caller's random state is left as it was."""
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for i, seed in enumerate(seeds):
            torch.default_generator.manual_seed(seed)
            out[i] = policy(images[i])
    return out


def policy_seeds(seed: int, epoch: int, indices: list[int]) -> list[int]:
    """The seed of each image's policy draw in `epoch`: one per (run seed, epoch, image index)."""
    return [mix_seed(seed, epoch, i, 1) for i in indices]  # the 1: a stream apart from the sampler's


def default_policy_workers(device: torch.device, processes: int = 1) -> int:
    """Workers for the policy when --workers is auto: on a GPU the machine's cores but one per
    training process (a worker's chunk is pure CPU work); on the CPU none: the cores are training,
    and the policy, a few percent of an epoch there, runs in line."""
    if device.type != "cuda":
        return 0
    return max(1, available_cpus() // max(1, processes) - 1)


class _EpochChunks(Dataset):
    """Item (epoch, k): the k-th chunk of the training images with the policy of that epoch applied."""

    def __init__(self, images: torch.Tensor, seed: int, policy: str, chunk: int) -> None:
        self.images, self.seed, self.policy, self.chunk = images, seed, policy_transform(policy), chunk

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, k = key
        lo, hi = k * self.chunk, min(len(self.images), (k + 1) * self.chunk)
        return apply_policy(self.images[lo:hi], policy_seeds(self.seed, epoch, list(range(lo, hi))), self.policy)


class _ChunksFrom(Sampler):
    """Every chunk of epoch `first`, then every chunk of the next epoch, and so on without end."""

    def __init__(self, first: int, chunks: int) -> None:
        self.first, self.chunks = first, chunks

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count(self.first):
            for k in range(self.chunks):
                yield epoch, k


class PolicyEpochs:
    """`epoch(e)`: all training images (uint8, on the CPU, in index order) with epoch e's policy.

    Asked for the epoch after the last one, the answer is mostly computed already; asked for any
    other (the first, or after a resume), the workers start again from that epoch. `close()` stops
    them."""

    def __init__(self, images: torch.Tensor, seed: int, policy: str, workers: int, *, chunk: int = CHUNK) -> None:
        if workers < 1:
            raise ValueError(f"PolicyEpochs needs at least one worker, not {workers}")
        self.dataset = _EpochChunks(images, seed, policy, chunk)
        self.chunks = -(-len(images) // chunk)
        self.workers = workers
        self._chunks: Iterator[torch.Tensor] | None = None
        self._next = None  # the epoch whose chunks `_chunks` hands out next

    def _start(self, epoch: int) -> None:
        self.close()
        # Two epochs' worth of chunks in flight at most: the next epoch is ready when asked for.
        prefetch = max(2, -(-2 * self.chunks // self.workers))
        loader = DataLoader(self.dataset, batch_size=None, sampler=_ChunksFrom(epoch, self.chunks),
                            num_workers=self.workers, prefetch_factor=prefetch)
        self._chunks, self._next = iter(loader), epoch

    def epoch(self, epoch: int) -> torch.Tensor:
        if self._chunks is None or self._next != epoch:
            self._start(epoch)
        parts = [next(self._chunks) for _ in range(self.chunks)]
        self._next = epoch + 1
        return torch.cat(parts)

    def close(self) -> None:
        """Stop the workers (they are started again if another epoch is asked for)."""
        self._chunks, self._next = None, None  # the loader's iterator shuts its workers down when dropped
