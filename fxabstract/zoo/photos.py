"""Real photos that ship inside packages, as ImageNet-normalised crops (no download at run time).

Nine colour photos: scikit-image's `skimage.data` (astronaut, coffee, chelsea, rocket,
immunohistochemistry, hubble_deep_field, retina) and scikit-learn's `load_sample_images` (china,
flower). Benchmarks calibrate on crops of some photos and evaluate on crops of the others, so the
two sets share no pixels:

    >>> x_cal = crops(["astronaut", "coffee", "rocket"], n=64, size=160, seed=0)   # [64, 3, 160, 160]
    >>> x_eval = crops(["chelsea", "china"], n=64, size=160, seed=1)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DependencyError

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
SKLEARN_PHOTOS = ("china", "flower")
PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def photo(name: str) -> torch.Tensor:
    """One photo as float32 RGB in [0, 1]: [3, H, W]."""
    if name not in PHOTOS:
        raise ConfigError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image
        image = load_sample_image(f"{name}.jpg")
    else:
        try:
            import skimage.data
        except ImportError:
            raise DependencyError(f"photo {name!r} ships with scikit-image, which is not installed; "
                                  "pip install scikit-image") from None
        image = getattr(skimage.data, name)()
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ImageNet-normalised (the torchvision classifiers' input)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def crops(names, n: int, size: int = 224, seed: int = 0, scale: tuple[float, float] = (0.1, 1.0),
          ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """n random-resized crops (torchvision's RandomResizedCrop: area fraction in `scale`, aspect in
    `ratio`, then a horizontal flip with probability 1/2), photos taken in turn from `names`, resized
    to size x size with antialiased bilinear interpolation and ImageNet-normalised: [n, 3, size, size]."""
    names = list(names)
    if not names:
        raise ConfigError(f"crops needs at least one photo name; choose from {', '.join(PHOTOS)}")
    if n < 1 or size < 1:
        raise ConfigError(f"crops needs n >= 1 and size >= 1, got n={n}, size={size}")
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        image = photo(names[i % len(names)])
        _, H, W = image.shape
        for _ in range(10):  # torchvision's rejection sampling of a box that fits, then a centre crop
            area = H * W * uniform(*scale)
            aspect = torch.exp(torch.tensor(uniform(*map(float, torch.log(torch.tensor(ratio))))))
            w, h = int(round((area * float(aspect)) ** 0.5)), int(round((area / float(aspect)) ** 0.5))
            if 0 < w <= W and 0 < h <= H:
                top = int(torch.randint(0, H - h + 1, (), generator=gen))
                left = int(torch.randint(0, W - w + 1, (), generator=gen))
                break
        else:
            h = w = min(H, W)
            top, left = (H - h) // 2, (W - w) // 2
        box = image[None, :, top:top + h, left:left + w]
        if float(torch.rand((), generator=gen)) < 0.5:
            box = box.flip(-1)
        out[i] = F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return normalise(out.clamp(0, 1))
