"""Joint image + box augmentations, as in DETR.

Every transform takes and returns ``(image, target)``. Before `ToTensor` the image is a PIL image and
``target["boxes"]`` is a FloatTensor[n, 4] of absolute ``(x0, y0, x1, y1)`` pixel coordinates;
`Normalize` turns them into ``(cx, cy, w, h)`` relative to the final image size, which is what the
detector's box head predicts.

Randomness comes from Python's `random` (flip, scale choice, crop size) and torch's RNG (crop position,
via torchvision), exactly as in DETR, so a pipeline is reproducible once both are seeded. DataLoader
workers reseed both per worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from sdetr.detector.config import DataConfig
from sdetr.detector.errors import ConfigError

Target = dict[str, Any]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-instance fields that must be filtered together when a crop removes boxes.
_INSTANCE_FIELDS = ("boxes", "labels", "area", "iscrowd")


# -- functional ops --------------------------------------------------------------------------------
def crop(image: PIL.Image.Image, target: Target, region: tuple[int, int, int, int]):
    """Crop ``region = (top, left, height, width)``; clip boxes to it and drop those left empty."""
    top, left, height, width = region
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        corners = boxes.reshape(-1, 2, 2)
        corners = torch.min(corners, torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
        extent = corners[:, 1, :] - corners[:, 0, :]
        target["boxes"] = corners.reshape(-1, 4)
        # As DETR: the area becomes the visible box area (used only for statistics, not for the loss).
        target["area"] = extent.prod(dim=1)
        keep = (extent > 0).all(dim=1)
        for name in _INSTANCE_FIELDS:
            if name in target:
                target[name] = target[name][keep]
    return image, target


def hflip(image: PIL.Image.Image, target: Target):
    """Mirror left-right: x0' = W - x1, x1' = W - x0."""
    width = image.width
    image = F.hflip(image)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )
    return image, target


def resized_hw(width: int, height: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` with the short side ``size``, shrunk so the long side stays <= ``max_size``.

    Same rounding as DETR, so official image sizes (and hence cost numbers) are reproduced.
    """
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: PIL.Image.Image, target: Target, size: int, max_size: int | None = None):
    """Resize keeping the aspect ratio (see `resized_hw`) and scale boxes and areas to match."""
    out_h, out_w = resized_hw(image.width, image.height, size, max_size)
    ratio_w, ratio_h = out_w / image.width, out_h / image.height
    image = F.resize(image, [out_h, out_w])
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w], dtype=torch.int64)
    return image, target


# -- transform objects -----------------------------------------------------------------------------
class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resize so the short side is one of ``sizes`` (chosen uniformly) and the long side <= max_size."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ConfigError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random ``h x w`` window with each side drawn from [min_size, max_size].

    DETR's version fails on images smaller than ``min_size``; small synthetic images are allowed here
    by never asking for more than the image has.
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ConfigError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        hi_w, hi_h = min(image.width, self.max_size), min(image.height, self.max_size)
        w = random.randint(min(self.min_size, hi_w), hi_w)
        h = random.randint(min(self.min_size, hi_h), hi_h)
        region = T.RandomCrop.get_params(image, [h, w])
        return crop(image, target, region)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability p, otherwise ``second``."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p},\n  {self.first!r},\n  {self.second!r})"


class ToTensor:
    """PIL image -> FloatTensor[3, H, W] in [0, 1]."""

    def __call__(self, image, target):
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Standardise pixels; boxes xyxy pixels -> cxcywh in [0, 1] relative to the image [3, H, W]."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor, target: Target | None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            h, w = image.shape[-2:]
            x0, y0, x1, y1 = target["boxes"].unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# -- factory ---------------------------------------------------------------------------------------
def make_transforms(split: str, cfg: DataConfig) -> Compose:
    """DETR's pipelines.

    train: flip -> either multi-scale resize, or (resize -> random crop -> multi-scale resize)
           (the second branch only when ``cfg.random_crop``) -> tensor -> normalise.
    val:   resize to ``cfg.val_scale`` (long side <= ``cfg.val_max_size``) -> tensor -> normalise.
    """
    finish = [ToTensor(), Normalize()]
    if split == "train":
        multi_scale = RandomResize(cfg.train_scales, max_size=cfg.train_max_size)
        if cfg.random_crop:
            cropped = Compose(
                [
                    RandomResize(cfg.crop_resize_scales),
                    RandomSizeCrop(cfg.crop_min_size, cfg.crop_max_size),
                    multi_scale,
                ]
            )
            scale_step: Callable = RandomSelect(multi_scale, cropped)
        else:
            scale_step = multi_scale
        return Compose([RandomHorizontalFlip(0.5), scale_step, *finish])
    if split == "val":
        return Compose([RandomResize([cfg.val_scale], max_size=cfg.val_max_size), *finish])
    raise ConfigError(f"unknown split {split!r}; expected 'train' or 'val'")
