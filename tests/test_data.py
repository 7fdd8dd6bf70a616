"""Reading CIFAR-10 files, the transforms, the split and the seeded loaders."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import data
from conftest import dump_py2, rows, synthetic_images
from data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    DataError,
    EpochSampler,
    TorchvisionLoader,
    eval_transform,
    load_cifar10,
    read_batch,
    read_meta,
    split_train_val,
    stratified_order,
    train_transform,
)

CPU = torch.device("cpu")


def _batch(n=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    return synthetic_images(labels, rng), labels


# ----------------------------------------------------------------------------- the reader

@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_reader_reads_both_pickle_encodings(tmp_path, protocol):
    """The official Python 2 files (byte-string keys) and Python 3 re-pickles (str keys) read the same."""
    images, labels = _batch()
    obj = {"batch_label": "b", "labels": labels.tolist(), "data": rows(images), "filenames": ["a"] * len(labels)}
    path = tmp_path / "batch"
    if protocol == "py2":
        dump_py2(obj, path)
        assert b"numpy.core.multiarray" in path.read_bytes()  # the module path of the official files
    else:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    got_images, got_labels = read_batch(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_images.shape == (20, 32, 32, 3)


def test_reader_converts_planar_rows_to_hwc(tmp_path):
    data_rows = np.zeros((1, 3072), np.uint8)
    data_rows[0, :1024] = 200  # the red plane
    data_rows[0, 2048 + 5] = 7  # blue, row 0, column 5
    dump_py2({"labels": [3], "data": data_rows}, tmp_path / "b")
    images, _ = read_batch(tmp_path / "b")
    assert (images[0, :, :, 0] == 200).all() and images[0, 0, 5, 2] == 7 and images[0, 0, 4, 2] == 0


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _EvilOs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Evil, _EvilOs])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    images, _labels = _batch(4)
    path.write_bytes(pickle.dumps({"data": rows(images), "labels": payload(marker)}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1.*refused"):
        read_batch(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or unreadable"),
    ("shape", r"shape \(N, 3072\)"),
    ("dtype", "uint8"),
    ("labels_range", "labels out of range"),
    ("labels_count", "must be a list of 20"),
    ("not_dict", "expected a dict"),
    ("empty", "truncated or unreadable"),
])
def test_damaged_batch_gives_clear_error_naming_the_file(tmp_path, damage, message):
    images, labels = _batch()
    obj = {"labels": labels.tolist(), "data": rows(images)}
    if damage == "shape":
        obj["data"] = rows(images)[:, :3000]
    elif damage == "dtype":
        obj["data"] = rows(images).astype(np.float32)
    elif damage == "labels_range":
        obj["labels"] = [10] + labels.tolist()[1:]
    elif damage == "labels_count":
        obj["labels"] = labels.tolist()[:-1]
    elif damage == "not_dict":
        obj = [1, 2, 3]
    path = tmp_path / "data_batch_3"
    dump_py2(obj, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(DataError, match=message) as err:
        read_batch(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_meta_must_name_ten_classes(tmp_path):
    dump_py2({"label_names": list(CLASSES)}, tmp_path / "ok")
    assert read_meta(tmp_path / "ok") == CLASSES
    dump_py2({"label_names": ["a", "b"]}, tmp_path / "bad")
    with pytest.raises(DataError, match="bad.*10 CIFAR-10 classes"):
        read_meta(tmp_path / "bad")


def test_load_whole_folder(tiny_cifar):
    d = load_cifar10(tiny_cifar, download=False)
    assert d.train_images.shape == (140, 32, 32, 3) and d.test_images.shape == (50, 32, 32, 3)
    assert np.bincount(d.train_labels).tolist() == [14] * 10 and d.classes == CLASSES


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_4", "test_batch"])
def test_missing_file_is_named(tiny_copy, name):
    (tiny_copy / "cifar-10-batches-py" / name).unlink()
    with pytest.raises(DataError, match=f"{name}: file not found"):
        load_cifar10(tiny_copy)


def test_no_network_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere")
    text = str(err.value)
    assert "could not be downloaded" in text and "cifar-10-python.tar.gz" in text and "--data-dir" in text
    assert "\n" not in text


def test_download_fetches_and_verifies_official_archive(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        from conftest import write_cifar_folder
        write_cifar_folder(root, 2, 1)
    monkeypatch.setattr(data, "download_and_extract_archive", fake_download)
    d = load_cifar10(tmp_path)
    assert calls == [(data.CIFAR10_URL, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    assert len(d.train_labels) == 20
    load_cifar10(tmp_path)  # present now: no second download
    assert len(calls) == 1


# ----------------------------------------------------------------------------- transforms

def test_train_transform_is_the_papers_in_order():
    t = train_transform().transforms
    assert [type(x) for x in t] == [v2.RandomCrop, v2.RandomHorizontalFlip, v2.RandomRotation, v2.ToImage,
                                    v2.ToDtype, v2.Normalize]
    crop, flip, rot, _, to_dtype, norm = t
    assert crop.size == (32, 32) and crop.padding == [4, 4, 4, 4] and crop.fill == 0
    assert crop.padding_mode == "constant"
    assert flip.p == 0.5
    assert rot.degrees == [-10.0, 10.0] and rot.fill == 0 and not rot.expand
    assert to_dtype.dtype == torch.float32 and to_dtype.scale
    assert tuple(norm.mean) == CIFAR10_MEAN and tuple(norm.std) == CIFAR10_STD


def test_eval_transform_only_normalises():
    t = eval_transform().transforms
    assert [type(x) for x in t] == [v2.ToImage, v2.ToDtype, v2.Normalize]
    images, _ = _batch(1)
    from PIL import Image
    out = eval_transform()(Image.fromarray(images[0]))
    expected = (torch.from_numpy(images[0]).permute(2, 0, 1) / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) \
        / torch.tensor(CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(out, expected)


def test_normalisation_constants_match_the_real_images(proxy_dir):
    """Recompute the per-channel mean and std from the training images of CIFAR10_DIR.

    The proxy holds 40,000 of the 50,000 official training images as JPEG (quality 75); measured
    there: mean (0.4910, 0.4820, 0.4465), std (0.2450, 0.2424, 0.2602), within 0.001 and 0.003 of
    the constants. A tolerance of 0.005 catches a swapped channel or the often-copied wrong std
    (0.2023, 0.1994, 0.2010)."""
    pixels = load_cifar10(proxy_dir, download=False).train_images.reshape(-1, 3)
    counts = np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(3)])  # a histogram per channel
    values = np.arange(256) / 255
    mean = counts @ values / counts.sum(1)
    std = np.sqrt(counts @ values**2 / counts.sum(1) - mean**2)
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=0.005)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=0.005)


# ----------------------------------------------------------------------------- split

def test_validation_split_is_fixed_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 500)
    train, val = split_train_val(labels, 1000)
    assert len(val) == 1000 and len(train) == 4000 and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [100] * 10
    _train2, val2 = split_train_val(labels, 1000)
    np.testing.assert_array_equal(val, val2)


def test_stratified_order_prefixes_keep_proportions():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    order = stratified_order(labels)
    assert sorted(order.tolist()) == list(range(1000))
    for k in (10, 100, 250):
        counts = np.bincount(labels[order[:k]], minlength=3)
        np.testing.assert_allclose(counts, [0.6 * k, 0.3 * k, 0.1 * k], atol=1)


def test_subset_and_bad_sizes():
    labels = np.repeat(np.arange(10), 50)
    train, val = split_train_val(labels, 100, subset=200)
    assert len(train) == 200 and np.bincount(labels[train]).tolist() == [20] * 10
    assert not set(train) & set(val)
    train0, val0 = split_train_val(labels, 0)
    assert len(train0) == 500 and len(val0) == 0
    with pytest.raises(DataError, match="--val-size"):
        split_train_val(labels, 500)
    with pytest.raises(DataError, match="--subset"):
        split_train_val(labels, 100, subset=401)


# ----------------------------------------------------------------------------- loaders

def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in pairs)


def test_loader_is_seeded_and_independent_of_workers():
    images, labels = _batch(40)
    make = lambda seed, workers: TorchvisionLoader(images, labels, 16, seed=seed, workers=workers, device=CPU)
    first = _epoch(make(0, 0), 1)
    assert [len(y) for _, y in first] == [16, 16, 8]
    assert _same(first, _epoch(make(0, 0), 1))
    assert _same(first, _epoch(make(0, 2), 1))  # worker processes draw the same augmentation
    assert not _same(first, _epoch(make(0, 0), 2))  # a new epoch: a new order and new draws
    assert not _same(first, _epoch(make(1, 0), 1))  # another seed
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(labels.tolist())


def test_loader_resumes_mid_epoch_and_shards_across_ranks():
    images, labels = _batch(48)
    full = _epoch(TorchvisionLoader(images, labels, 8, seed=3, workers=0, device=CPU), 5)
    tail = _epoch(TorchvisionLoader(images, labels, 8, seed=3, workers=0, device=CPU), 5, start=2)
    assert _same(full[2:], tail)
    # Two ranks at 4 images each see, together, exactly the single process's batches of 8.
    ranks = [_epoch(TorchvisionLoader(images, labels, 4, seed=3, workers=0, device=CPU, rank=r, world_size=2), 5)
             for r in range(2)]
    for step, (x, y) in enumerate(full):
        (x0, y0), (x1, y1) = ranks[0][step], ranks[1][step]
        merged_x = torch.stack([x0, x1], 1).reshape(-1, *x.shape[1:])  # rank r holds positions r, r+2, ...
        assert torch.equal(merged_x, x) and torch.equal(torch.stack([y0, y1], 1).reshape(-1), y)


def test_epoch_sampler_seeds_are_per_image():
    s = EpochSampler(10, seed=0)
    s.set_epoch(1)
    first = dict(iter(s))
    s.set_epoch(2)
    second = dict(iter(s))
    assert sorted(first) == list(range(10)) and len(set(first.values())) == 10
    assert all(first[i] != second[i] for i in range(10))
