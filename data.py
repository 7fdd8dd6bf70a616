"""CIFAR-10 for training and evaluation: reading the files, the paper's transforms, the loaders.

The data comes from the official python layout, `<data-dir>/cifar-10-batches-py/`
(`data_batch_1..5`, `test_batch`, `batches.meta`), read by a small reader of our own into uint8
arrays. We do not go through `torchvision.datasets.CIFAR10`: it refuses any folder whose md5 sums
are not the official ones, so a re-encoded or repaired copy would be unusable. The batch files are
pickles; they are unpickled with an allow-list that admits only what numpy arrays need, so a
tampered file cannot run code. When the folder is missing, the official archive is downloaded
(md5-checked) and extracted.

Augmentation is a pure function of (seed, epoch, image index): the sampler hands every image its
own seed, so an epoch's batches are the same whatever the number of workers or processes, and a
run resumed mid-epoch sees exactly the batches it would have seen.
"""
from __future__ import annotations

import codecs
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
from numpy._core import multiarray, numeric
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from writes import WriteError, check_folder, missing_folders, remove_empty, size_text, write_error

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
EPOCH_CHUNK = 8192  # about this many images augmented per launch by the device loader on a GPU
# Automatic augmentation policies (--augment), applied to each training image before cutout.
# trivialaugment: torchvision's TrivialAugmentWide (Mueller & Hutter, 2021): one of 14 operations
# per image, at a uniformly random strength, with no parameters to tune. The torchvision loader
# applies it after the crop and flip, the device loader before them (its colour operations commute
# with both, and its shears, shifts and rotations are drawn symmetrically, so a flip maps the
# distribution onto itself).
AUGMENT_POLICIES = ("none", "trivialaugment")
FLIPS = ("random", "alternate")  # --flip: each epoch's own coin per image, or the other side each epoch


class DataError(Exception):
    """The data set is missing or a file of it is unusable; the message says which and what to do."""


# ----------------------------------------------------------------------------- reading the files

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes in protocol 2 as _codecs.encode(text, "latin1"); admit nothing else.
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"it asks for codec {encoding!r}, which a CIFAR-10 file never uses")
    return codecs.encode(text, encoding)


# Everything a CIFAR-10 batch pickle may name: numpy's array rebuilders, under the pre-2.0 module
# path of the official files and under numpy 2's, and the codec of Python 3's protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"it asks for {module}.{name}, which a CIFAR-10 file never holds") from None


def _unpickle(path: Path) -> dict:
    """Load one CIFAR-10 pickle (Python 2's official files or a Python 3 re-pickle) as a str-keyed dict."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _Refused as e:
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
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


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
    """Download the official archive into `root` and extract it there, once the disk is seen to have
    room for both. On failure it removes what it wrote (the archive unless it was there before, the
    folder extracted in part, the folders it made) and raises DataError saying why."""
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
    """The whole data set in memory: 50,000 + 10,000 images are 180 MB of uint8."""

    train_images: np.ndarray  # uint8 N x 32 x 32 x 3
    train_labels: np.ndarray  # int64 N
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


# ----------------------------------------------------------------------------- splits

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


# ----------------------------------------------------------------------------- transforms

def normalize() -> v2.Normalize:
    return v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)


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
        normalize(),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), normalize()])


# ----------------------------------------------------------------------------- datasets and loaders

def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64), so nearby inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z >> 1


class ImageDataset(Dataset):
    """uint8 HWC images and labels served through a transform, as PIL images like torchvision's CIFAR10.

    An item key is an index, or `(index, seed)`: then the transform's random draws come from a
    generator freshly seeded with `seed`, which makes the augmentation of each image reproducible."""

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
    """DistributedSampler's seeded per-epoch permutation, sliced per rank, yielding `(index, seed)`.

    Each image's seed is a hash of (run seed, epoch, index), and `set_epoch(epoch, start)` can skip
    the first `start` samples of this rank's shard, for a resume in the middle of an epoch."""

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


def _init_worker(worker_id: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: let the main process alone decide how
    # to stop (it exits at a step boundary; workers end with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # numpy and random are not used by the transforms; seed them for any code that does.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def available_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(device: torch.device) -> int:
    """DataLoader workers for this machine: enough to feed a GPU; on CPU one, so the model keeps the cores."""
    cpus = available_cpus()
    return min(8, cpus) if device.type == "cuda" else min(1, cpus - 1)


class _EpochBatches:
    """What both training loaders share: batches of `batch_size` per rank in an EpochSampler's order.

    `set_epoch(epoch, start_step)` picks the epoch's permutation (and a step to start at) before
    iterating; `len()` is the number of steps left in that epoch. `resolution` is the side, in
    pixels, of the batches handed out (progressive resizing: below 32 they are scaled down)."""

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


class TorchvisionLoader(_EpochBatches):
    """The paper's pipeline: PIL transforms in DataLoader workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int, workers: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, rotation: float = 10.0,
                 policy: str = "none") -> None:
        self.batch_size = batch_size
        self.sampler = EpochSampler(len(images), seed, rank, world_size)
        self.loader = DataLoader(
            ImageDataset(images, labels, train_transform(rotation, policy)), batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=_init_worker, generator=torch.Generator().manual_seed(seed), drop_last=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._sized(iter(self.loader))


def make_eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, *, workers: int,
                     device: torch.device, rank: int = 0, world_size: int = 1, on_device: bool = False):
    """Unshuffled, unaugmented batches of this rank's share (every world_size-th image) of a split:
    normalised on the device from uint8 held there (`on_device`), or by DataLoader workers."""
    shard = slice(rank, None, world_size)
    if on_device:
        return DeviceBatches(images[shard], labels[shard], batch_size, device)
    return DataLoader(ImageDataset(images[shard], labels[shard], eval_transform()), batch_size=batch_size,
                      shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=_init_worker)


# ----------------------------------------------------------------------------- augmentation on the device

def to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x 32 x 32 x 3 (HWC) -> uint8 N x 3 x 32 x 32 on the device."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float B x 3 x H x W batch scaled to size x size by area averaging (each pixel of the smaller
    image is the mean of the pixels it covers, as a coarser camera would see them); unchanged if it
    is that size already. The network takes any size: its global average pool ends at 1 x 1."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area")


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32, scaled to [0, 1] and normalised with the CIFAR-10 mean and std."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


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


class DeviceLoader(_EpochBatches):
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
            from policy_workers import PolicyEpochs  # imported here: it builds on this module
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


class DeviceBatches:
    """Unaugmented batches of uint8 images held on the device, normalised one batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device) -> None:
        self.images, self.labels = to_device_images(images, device), torch.from_numpy(labels).to(device)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield normalize_batch(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)
