"""The device loader's batched augmentation draws from the same distribution as the paper's PIL
pipeline: same parameter ranges and rates, same pixels for the same parameters, same statistics."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import synthetic_images
from data import PAD, TorchvisionLoader, eval_transform, to_device_images, train_transform
from training.device_loader import DeviceLoader, augment_batch, augment_params
from training.evaluation import DeviceBatches

CPU = torch.device("cpu")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return synthetic_images(rng.integers(0, 10, n), rng)


def _pil_pipeline(image: np.ndarray, top: int, left: int, flip: bool, angle: float) -> torch.Tensor:
    """The PIL pipeline with its random draws replaced by the given parameters."""
    im = TF.crop(TF.pad(Image.fromarray(image), [PAD] * 4, fill=0), top, left, 32, 32)
    im = TF.rotate(TF.horizontal_flip(im) if flip else im, angle, interpolation=v2.InterpolationMode.NEAREST, fill=0)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def test_same_parameters_give_the_same_pixels_as_pil():
    """For given crop offsets, flip and angle, the batched gather reproduces PIL pixel for pixel,
    up to float rounding on the rare pixel centres that fall exactly on a pixel border (measured:
    16 of 65,536 pixels; allowed: 0.1%)."""
    images = _images(64)
    params = augment_params(64, torch.Generator().manual_seed(0))
    out = augment_batch(to_device_images(images, CPU), **params)
    expected = torch.stack([_pil_pipeline(images[i], int(params["top"][i]), int(params["left"][i]),
                                          bool(params["flip"][i]), float(params["angle"][i])) for i in range(64)])
    assert out.dtype == torch.uint8 and out.shape == (64, 3, 32, 32)
    mismatched = (out != expected).any(1).float().mean().item()
    assert mismatched < 1e-3
    assert (out == 0).any()  # padding and rotation corners are filled with zeros, as PIL fills them


def test_no_rotation_is_an_exact_crop_and_flip():
    images = _images(16)
    params = augment_params(16, torch.Generator().manual_seed(1), rotation=0.0)
    assert (params["angle"] == 0).all()
    out = augment_batch(to_device_images(images, CPU), **params)
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    for i in range(16):
        top, left = int(params["top"][i]), int(params["left"][i])
        crop = padded[i, top:top + 32, left:left + 32]
        crop = crop[:, ::-1] if params["flip"][i] else crop
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), crop)


def test_parameter_ranges_and_rates_match_torchvision():
    """20,000 draws from each side. Crop offsets take the 9 values 0..8 each with frequency 1/9 ± 0.01
    (4.5 standard errors), flips happen at rate 1/2 ± 0.01, angles cover [-10, 10] uniformly
    (mean 0 ± 0.15, std 10/√3 ± 0.1)."""
    n = 20_000
    torch.manual_seed(0)
    ours = augment_params(n, torch.Generator().manual_seed(0))
    crop, rotate, flip = v2.RandomCrop(32, padding=4), v2.RandomRotation(10), v2.RandomHorizontalFlip()
    probe = torch.arange(32, dtype=torch.uint8).repeat(3, 32, 1)  # asymmetric: a flip is visible
    theirs = {"top": [], "left": [], "angle": [], "flip": []}
    for _ in range(n):
        p = crop.make_params([probe])
        theirs["top"].append(p["top"])
        theirs["left"].append(p["left"])
        theirs["angle"].append(rotate.make_params([probe])["angle"])
        theirs["flip"].append(bool(flip(probe)[0, 0, 0] == 31))
    theirs = {k: torch.tensor(v) for k, v in theirs.items()}
    for side in (ours, theirs):
        for key in ("top", "left"):
            freq = torch.bincount(side[key], minlength=9).float() / n
            assert len(freq) == 9 and (freq - 1 / 9).abs().max() < 0.01
        assert abs(side["flip"].float().mean().item() - 0.5) < 0.01
        angle = side["angle"].float()
        assert angle.min() >= -10 and angle.max() <= 10 and angle.min() < -9.9 and angle.max() > 9.9
        assert abs(angle.mean().item()) < 0.15 and abs(angle.std().item() - 10 / 3 ** 0.5) < 0.1


def test_augmented_pixel_statistics_agree_between_loaders():
    """2,000 augmented copies of 2 fixed images from each pipeline. Per pixel, the difference of the
    two means in units of its standard error is a z-score; if both draw from one distribution, the
    z-scores are ~N(0, 1): their mean absolute value is about √(2/π) ≈ 0.80 (measured 0.72: pixel
    values are discrete) and, over 6,144 pixels, the largest stays below 5 with probability 99.6%
    (fixed seeds make the outcome repeatable; measured 3.7). Measured on deliberately wrong
    pipelines: crop offsets 0..7 instead of 0..8 give a largest z of 9.2, rotation within ±5°
    instead of ±10° 10.6, no flip 34."""
    k = 2000
    images = _images(2, seed=3)
    pil = train_transform().transforms[:4]  # crop, flip, rotation, to-image: uint8, unnormalised
    torch.manual_seed(0)
    a = torch.stack([torch.stack([v2.Compose(pil)(Image.fromarray(img)) for _ in range(k)]) for img in images])
    params = augment_params(2 * k, torch.Generator().manual_seed(0))
    source = to_device_images(images, CPU).repeat_interleave(k, 0)
    b = augment_batch(source, **params).view(2, k, 3, 32, 32)
    a, b = a.double() / 255, b.double() / 255
    se = ((a.var(1) + b.var(1)) / k).sqrt()
    varying = se > 0
    z = (a.mean(1) - b.mean(1))[varying] / se[varying]
    assert torch.equal(a.mean(1)[~varying], b.mean(1)[~varying])
    assert z.abs().max() < 5 and 0.6 < z.abs().mean() < 0.9
    # spread: per-pixel standard deviations agree to 3% on average
    sa, sb = a.std(1)[varying], b.std(1)[varying]
    assert ((sa - sb).abs() / (sa + sb) * 2).mean() < 0.03


def test_device_loader_visits_images_in_the_torchvision_loaders_order():
    images, labels = _images(40), np.arange(40) % 10
    dev = DeviceLoader(images, labels, 16, seed=5, device=CPU)
    ref = TorchvisionLoader(images, labels, 16, seed=5, workers=0, device=CPU)
    for loader in (dev, ref):
        loader.set_epoch(3)
    dev_batches, ref_batches = list(dev), list(ref)
    assert [len(y) for _, y in dev_batches] == [16, 16, 8] and len(dev) == 3 and dev.steps_per_epoch == 3
    assert torch.equal(torch.cat([y for _, y in dev_batches]), torch.cat([y for _, y in ref_batches]))
    x, _ = dev_batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)


def test_device_loader_is_seeded_resumable_and_shards_per_rank():
    images, labels = _images(48), np.arange(48) % 10

    def epoch(loader, e, start=0):
        loader.set_epoch(e, start)
        return list(loader)

    full = epoch(DeviceLoader(images, labels, 8, seed=0, device=CPU), 2)
    again = epoch(DeviceLoader(images, labels, 8, seed=0, device=CPU), 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(full, again, strict=True))
    other = epoch(DeviceLoader(images, labels, 8, seed=0, device=CPU), 3)
    assert not torch.equal(full[0][0], other[0][0])
    tail = epoch(DeviceLoader(images, labels, 8, seed=0, device=CPU), 2, start=4)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(full[4:], tail, strict=True))
    ranks = [epoch(DeviceLoader(images, labels, 4, seed=0, device=CPU, rank=r, world_size=2), 2) for r in range(2)]
    for step, (x, _) in enumerate(full):
        merged = torch.stack([ranks[0][step][0], ranks[1][step][0]], 1).reshape(x.shape)
        assert torch.equal(merged, x)  # each image is augmented the same whatever the number of processes


@pytest.mark.parametrize("batch", [7, 50])
def test_device_eval_batches_equal_the_eval_transform(batch):
    images, labels = _images(20), np.arange(20) % 10
    got = torch.cat([x for x, _ in DeviceBatches(images, labels, batch, CPU)])
    expected = torch.stack([eval_transform()(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(got, expected)


def test_cutout_blanks_one_clipped_square_and_leaves_the_other_draws_alone():
    """With --cutout the crop, flip and angle draws are the ones drawn without it; each image differs
    from its cutout-free twin exactly inside the square centred on its drawn centre (clipped at the
    border), where it is zero."""
    images, size = _images(32), 8
    plain = augment_params(32, torch.Generator().manual_seed(2), rotation=0.0)
    cut = augment_params(32, torch.Generator().manual_seed(2), rotation=0.0, cutout=size)
    assert all(torch.equal(plain[k], cut[k]) for k in plain)
    source = to_device_images(images, CPU)
    without, with_cut = augment_batch(source, **plain), augment_batch(source, **cut, cutout=size)
    for i in range(32):
        y0, x0 = int(cut["cut_y"][i]) - size // 2, int(cut["cut_x"][i]) - size // 2
        square = torch.zeros(32, 32, dtype=torch.bool)
        square[max(y0, 0):y0 + size, max(x0, 0):x0 + size] = True
        assert (with_cut[i][:, square] == 0).all()
        assert torch.equal(with_cut[i][:, ~square], without[i][:, ~square])
    centres = torch.stack([cut["cut_y"], cut["cut_x"]])
    assert centres.min() >= 0 and centres.max() <= 31 and len(set(cut["cut_y"].tolist())) > 8


def test_device_loader_applies_cutout():
    images = _images(128)
    labels = np.zeros(128, dtype=np.int64)
    common = {"seed": 0, "device": CPU, "rotation": 0.0}
    plain = DeviceLoader(images, labels, 64, **common)
    cut = DeviceLoader(images, labels, 64, cutout=12, **common)
    for loader in (plain, cut):
        loader.set_epoch(1)
    black = DeviceBatches(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), 1, CPU)
    black_value = next(iter(black))[0][0, :, 0, 0]  # a zero pixel after normalisation
    for (a, _), (b, _) in zip(plain, cut, strict=True):
        changed = (a != b).any(1)  # B x H x W: pixels the cutout changed
        per_image = changed.flatten(1).sum(1)
        assert (per_image <= 144).all() and (per_image > 0).float().mean() > 0.9
        assert torch.allclose(b.permute(0, 2, 3, 1)[changed], black_value.expand(int(changed.sum()), 3))
