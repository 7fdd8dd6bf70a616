"""Seeded image corruptions for a robustness check: noise, blur, JPEG, brightness, contrast.

In the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019), but generated on the fly from the test
set, so no second data set is needed. Every function takes a batch of uint8 images, N x 32 x 32 x 3
(HWC, RGB, as `data.read_batch` returns them), and returns a new uint8 array of the same shape;
floats exist for one batch at a time only. No I/O.

Only the noise is random. Its generator comes from `corruption_rng(seed, name, severity)`, and the
draws are consumed in image order, so the corrupted images are the same for a given seed whatever
the batch size.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

# The parameter of each corruption at severities 1, 2, 3 (0 is the clean image). Chosen so that
# severity 1 is a mild, realistic degradation and severity 3 a strong one that a person still reads.
SEVERITIES: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (8.0, 16.0, 32.0),  # noise standard deviation, in grey levels of 0..255, i.i.d. per value
    "gaussian_blur": (0.6, 1.0, 1.5),  # Gaussian kernel standard deviation, in pixels (kernel 2*ceil(3*sigma)+1)
    "jpeg": (50.0, 20.0, 8.0),  # Pillow JPEG quality, 1..95 (lower is worse; 4:2:0 chroma subsampling)
    "brightness": (1.3, 1.6, 2.0),  # every value multiplied by this factor, clipped at 255
    "contrast": (0.6, 0.4, 0.2),  # distance from the image's mean grey level multiplied by this factor
}
PARAMETER_UNITS: dict[str, str] = {
    "gaussian_noise": "noise sigma (grey levels of 255)",
    "gaussian_blur": "blur sigma (pixels)",
    "jpeg": "JPEG quality (1-95)",
    "brightness": "brightness factor (x)",
    "contrast": "contrast factor (x)",
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. normal noise of standard deviation `sigma` grey levels: sensor noise, low light."""
    noise = rng.standard_normal(images.shape, dtype=np.float32) * np.float32(sigma)
    return _to_uint8(images.astype(np.float32) + noise)


def gaussian_blur(images: np.ndarray, sigma: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Blur with a Gaussian of `sigma` pixels (reflected borders): defocus, a cheap upscale."""
    size = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the kernel's weight
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    blurred = TF.gaussian_blur(x, [size, size], [sigma, sigma])
    return np.ascontiguousarray(blurred.numpy().transpose(0, 2, 3, 1))


def jpeg(images: np.ndarray, quality: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encode and decode each image as JPEG at `quality` with Pillow: block artefacts, colour bleeding."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def brightness(images: np.ndarray, factor: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale every value by `factor` (clipped at 255): over-exposure, which also washes out colours."""
    return _to_uint8(images.astype(np.float32) * np.float32(factor))


def contrast(images: np.ndarray, factor: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pull each image towards its own mean grey level by `factor` (0: flat grey, 1: unchanged): haze, fog."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + (x - mean) * np.float32(factor))


CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "jpeg": jpeg,
    "brightness": brightness,
    "contrast": contrast,
}


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator for one (corruption, severity): the same seed gives the same images, and
    different corruptions or severities get unrelated draws."""
    return np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity])


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..3) to uint8 N x H x W x 3 images; same dtype and shape."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= len(SEVERITIES[name]):
        raise ValueError(f"severity must be 1..{len(SEVERITIES[name])}, got {severity}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 N x H x W x 3 images, got {images.dtype} of shape {images.shape}")
    return CORRUPTIONS[name](images, SEVERITIES[name][severity - 1], rng)
