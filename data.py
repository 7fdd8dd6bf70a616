"""CIFAR-10: reading the files, the download, the split, the paper's transforms, the torchvision loader.

The official python layout, `<data-dir>/cifar-10-batches-py/`, is read by a reader of our own:
`torchvision.datasets.CIFAR10` refuses any folder whose md5 sums are not the official ones (a
re-encoded copy such as the proxy), and its pickles are loaded with an allow-list that lets no
tampered file run code (files/safe_pickle.py). A missing folder is downloaded (md5-checked).
Augmentation is a pure function of (seed, epoch, image index), whatever the number of workers or
processes, so a run resumed mid-epoch sees exactly the batches it would have seen. The device
loader (training/device_loader.py) builds on the sampler and batches here.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from files import safe_pickle
from files.writes import WriteError, check_folder, missing_folders, remove_empty, size_text, write_error

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official archive
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_BYTES, EXTRACTED_BYTES = 170_498_071, 186_214_000  # the archive, and the folder it holds (about)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation (RGB, pixel values in [0, 1]) over all pixels of the
# 50,000 official training images; tests/test_data.py recomputes them from data.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SPLIT_SEED = 0  # the validation hold-out is fixed: it does not move with --seed
PAD = 4  # pixels of zero padding around an image before the random 32x32 crop
# --augment: trivialaugment is torchvision's TrivialAugmentWide (one of 14 operations per image at a
# random strength). The torchvision loader applies it after the crop and flip, the device loader
# before them: its shears, shifts and rotations are drawn symmetrically, so the two agree in law.
AUGMENT_POLICIES = ("none", "trivialaugment")


class DataError(Exception):
    """The data set is missing or a file of it is unusable; the message says which and what to do."""


def _unpickle(path: Path) -> dict:
    """Load one CIFAR-10 pickle (Python 2's official files or a Python 3 re-pickle) as a str-keyed dict."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            obj = safe_pickle.load(f)
    except safe_pickle.Refused as e:
        raise DataError(f"{path}: refused to load ({e}); nothing in it was run; "
                        "replace it with the official file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, UnicodeError, OSError) as e:
        raise DataError(f"{path}: truncated or unreadable ({type(e).__name__}: {e}); "
                        "replace it with the official file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}; not a CIFAR-10 file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file: images as uint8 N x 32 x 32 x 3 (HWC, RGB), labels as int64 N."""
    path = Path(path)
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if isinstance(labels, (list, tuple, np.ndarray)) else type(labels).__name__
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} class indices, got {n}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: 'labels' must be integers") from None
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES))):
        raise DataError(f"{path}: labels out of range: expected 0..{len(CLASSES) - 1}, "
                        f"got {labels.min()}..{labels.max()}")
    # The rows are channel-planar (1024 R, 1024 G, 1024 B); HWC is what PIL wants.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def read_meta(path: str | os.PathLike) -> tuple[str, ...]:
    """Read `batches.meta` and check that it names the ten CIFAR-10 classes."""
    path = Path(path)
    names = _unpickle(path).get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != len(CLASSES):
        raise DataError(f"{path}: 'label_names' must list the {len(CLASSES)} CIFAR-10 classes")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def ensure_cifar10(root: str | os.PathLike, download: bool = True) -> Path:
    """Return `root/cifar-10-batches-py`, downloading and extracting the official archive if absent."""
    root = Path(root)
    folder = root / FOLDER
    if not folder.is_dir() and download:
        download_cifar10(root)
    if not folder.is_dir():
        raise DataError(f"CIFAR-10 is not in {folder}; extract the official archive there or pass --data-dir")
    missing = [n for n in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder / missing[0]}: file not found (the folder lacks {', '.join(missing)}); "
                        "extract the official archive there again")
    return folder


def download_cifar10(root: Path) -> None:
    """Download the official archive into `root` and extract it, once the disk has room for both. On
    failure remove what was written (archive, partial folder, new folders) and raise DataError."""
    folder, archive = root / FOLDER, root / ARCHIVE
    made, had_archive = missing_folders(root), archive.is_file()
    instead = (f"download {CIFAR10_URL}, extract it into {root} so that {folder / TRAIN_FILES[0]} exists, or pass "
               "--data-dir to the folder that holds cifar-10-batches-py/")
    needed = EXTRACTED_BYTES + (0 if had_archive else ARCHIVE_BYTES)
    try:
        check_folder(root, needed, f"the download ({size_text(ARCHIVE_BYTES)} archive, {size_text(EXTRACTED_BYTES)} "
                     "extracted)")
    except WriteError as e:
        raise DataError(f"CIFAR-10 is not in {folder} and cannot be downloaded to {root}: {e.why}; {e.remedy}, "
                        f"or {instead}") from None
    try:
        download_and_extract_archive(CIFAR10_URL, root, filename=ARCHIVE, md5=CIFAR10_MD5)
    except Exception as e:  # no network, a proxy error, a bad md5, a full disk: all end here
        if not had_archive:
            with contextlib.suppress(OSError):
                archive.unlink()
        if folder.is_dir():  # absent before: extracted in part
            shutil.rmtree(folder, ignore_errors=True)
        remove_empty(made)
        failed = write_error(e, root, "the download", needed)
        why = f"{failed.why}; {failed.remedy}" if failed else f"{type(e).__name__}: {e}"
        raise DataError(f"CIFAR-10 is not in {folder} and could not be downloaded ({why}); {instead}") from None


@dataclass
class CIFAR10:
    """The whole data set in memory (180 MB of uint8): images N x 32 x 32 x 3, labels int64 N."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def load_cifar10(root: str | os.PathLike, download: bool = True) -> CIFAR10:
    """Read every file of the official layout under `root` (downloading it first if needed)."""
    folder = ensure_cifar10(root, download)
    classes = read_meta(folder / META_FILE)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    return CIFAR10(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_images, test_labels, classes)


def stratified_order(labels: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """A seeded order of all indices in which every prefix holds the classes in their overall
    proportions (up to one image per class), so `order[:k]` is a class-stratified sample of k."""
    labels = np.asarray(labels)
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels))
    for c in np.unique(labels):
        members = shuffled[labels[shuffled] == c]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)  # position within its class
    return shuffled[np.argsort(rank[shuffled], kind="stable")]


def split_train_val(labels: np.ndarray, val_size: int, subset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (training images, validation hold-out): a fixed, class-stratified `val_size`
    held out, and of the rest the first `subset` of a stratified order (all of them when 0)."""
    if not 0 <= val_size < len(labels):
        raise DataError(f"--val-size {val_size} must be in 0..{len(labels) - 1} for {len(labels)} training images")
    order = stratified_order(labels)
    val, train = order[:val_size], order[val_size:]
    if subset:
        if subset > len(train):
            raise DataError(f"--subset {subset} is more than the {len(train)} training images left after --val-size")
        train = train[stratified_order(labels[train], SPLIT_SEED + 1)[:subset]]
    return np.sort(train), np.sort(val)


def policy_transform(policy: str) -> v2.Transform | None:
    """The --augment policy's transform (None for none); it takes PIL images and uint8 tensors."""
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; known: {', '.join(AUGMENT_POLICIES)}")
    return v2.TrivialAugmentWide() if policy == "trivialaugment" else None


def train_transform(rotation: float = 10.0, policy: str = "none") -> v2.Compose:
    """The paper's augmentation, in its order: padded random crop, flip, rotation within +-10 deg;
    then the --augment policy, if any."""
    extra = policy_transform(policy)
    return v2.Compose([
        v2.RandomCrop(32, padding=PAD),  # zero padding of 4 px on each side, then a random 32x32 window
        v2.RandomHorizontalFlip(),  # p = 0.5
        *([v2.RandomRotation(rotation)] if rotation else []),  # uniform in [-10, 10] deg, nearest, zero fill
        *([extra] if extra is not None else []),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),  # uint8 0..255 -> float 0..1
        v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64), so nearby inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z >> 1


class ImageDataset(Dataset):
    """uint8 HWC images and labels served through a transform as PIL images, like torchvision's CIFAR10.
    A key is an index, or `(index, seed)`: then the transform's random draws are seeded with `seed`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # the CPU generator only: 2 us, not 200
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class EpochSampler(DistributedSampler):
    """DistributedSampler's seeded per-epoch permutation, sliced per rank, yielding `(index, seed)`:
    each image's seed hashes (run seed, epoch, index); `set_epoch(epoch, start)` skips the first
    `start` samples of this rank's shard, for a resume in the middle of an epoch."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def indices(self) -> list[int]:
        """This rank's images of the epoch, in order, from the start position on."""
        return list(super().__iter__())[self.start:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, mix_seed(self.seed, self.epoch, i)) for i in self.indices()])

    def __len__(self) -> int:
        return self.num_samples - self.start


def init_worker(worker_id: int) -> None:
    """Leave stopping to the main process (Ctrl-C reaches the whole group); seed numpy and random."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EpochBatches:
    """What both training loaders share: batches of `batch_size` per rank in an EpochSampler's order.
    `set_epoch(epoch, start_step)` picks the epoch (and a step to start at); `len()` is the steps left
    in it; `resolution` is the side of the batches handed out (below 32: progressive resizing)."""

    batch_size: int
    sampler: EpochSampler
    resolution: int = 32

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step * self.batch_size)

    def close(self) -> None:
        """Release what the loader holds beyond its data (the device loader's policy workers)."""

    def _sized(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, ...]]:
        for x, y in batches:
            yield resize_batch(x, self.resolution), y

    def __len__(self) -> int:
        return -(-self.images_left // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.sampler.num_samples // self.batch_size)

    @property
    def images_left(self) -> int:
        return len(self.sampler)


class TorchvisionLoader(EpochBatches):
    """The paper's pipeline: PIL transforms in DataLoader workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int, workers: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, rotation: float = 10.0,
                 policy: str = "none") -> None:
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(images), seed, rank, world_size)
        self.loader = DataLoader(
            ImageDataset(images, labels, train_transform(rotation, policy)), batch_size=batch_size,
            sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=init_worker, generator=torch.Generator().manual_seed(seed), drop_last=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._sized(iter(self.loader))


def to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x 32 x 32 x 3 (HWC) -> uint8 N x 3 x 32 x 32 on the device."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float B x 3 x H x W batch scaled to size x size by area averaging (as a coarser camera would
    see it); unchanged at that size. The network takes any size: its average pool ends at 1 x 1."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area")


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32, scaled to [0, 1] and normalised with the CIFAR-10 mean and std."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std
