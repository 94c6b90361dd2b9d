"""Image transforms: DomainBed's photo recipe and a light recipe for small in-memory digits.

Training transforms are called as ``transform(image, seed)``: the seed alone decides the
random augmentation, so the training loaders can replay any step exactly, on CPU, with
any number of workers. Evaluation transforms are called as ``transform(image)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Digits are normalised to [-1, 1]: ImageNet statistics mean nothing for them.
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)

# Largest shift of the digits' training augmentation, in pixels at 32x32.
DIGITS_MAX_SHIFT = 2


class SeededTransform:
    """Runs a transform that draws from torch's global generator under a given seed,
    leaving the caller's generator state as it was (model code relies on it)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: no lazy CUDA seeding
            return self.transform(image)


def photo_transform(image_size: int, train: bool) -> Callable:
    """DomainBed's recipe for PIL photos: crop/flip/jitter/grayscale for training only."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return T.Compose([T.Resize((image_size, image_size)), *normalize])
    return SeededTransform(
        T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.3, 0.3, 0.3, 0.3),
                T.RandomGrayscale(),
                *normalize,
            ]
        )
    )


class DigitsTransform:
    """uint8 CHW tensor -> normalised float tensor, optionally shifted by a few pixels.

    Training augmentation is a translation of at most ``DIGITS_MAX_SHIFT`` pixels each way
    (edges repeated), read from the sample's seed: the photo recipe's crops, flips and
    colour jitter would destroy 32x32 digits (a flipped 2 is not a 2) or erase the colour
    cues that make the domains differ, so they are left out. Every step is one small
    torch op (``index_select``, not ``F.pad`` or fancy indexing, which cost milliseconds
    per image when their threads compete for busy cores).
    """

    def __init__(self, image_size: int, native_size: int, train: bool) -> None:
        self.image_size = image_size
        self.native_size = native_size
        self.train = train
        self.offset = (255.0 * torch.tensor(DIGITS_MEAN)).view(3, 1, 1)
        self.divisor = (255.0 * torch.tensor(DIGITS_STD)).view(3, 1, 1)
        span = torch.arange(native_size)
        self.shifted = [  # shifted[k]: source rows (or columns) for an offset of k - max
            (span + k - DIGITS_MAX_SHIFT).clamp_(0, native_size - 1)
            for k in range(2 * DIGITS_MAX_SHIFT + 1)
        ]

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.train:  # the seed is a uniform 63-bit draw: its digits base 5 are two offsets
            choices = len(self.shifted)
            dy, dx = seed % choices, seed // choices % choices
            image = image.index_select(1, self.shifted[dy]).index_select(2, self.shifted[dx])
        x = (image.float() - self.offset).div_(self.divisor)
        if self.image_size != self.native_size:
            x = F.interpolate(
                x[None],
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
        return x
