"""Image transforms (albumentations 2.x): grayscale uint8 [H, W] -> float tensor [1, H, W].

Both pipelines keep the image size (dataset buckets are by exact size) and end in
`(x / 255 - MEAN) / STD`, so white paper is about +1.19 and black ink about -4.56.
The train pipeline is light: the text must stay readable.

Augmentation is reproducible: `seed_transform(transform, seed)` gives all transforms of a pipeline
one shared generator pair, so the images that follow are a pure function of the seed. (Compose's
own `seed=` gives every transform an identically seeded generator of its own, which makes their
apply/skip draws equal.)
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import random

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from pix2tex.preprocess import MEAN, STD  # the model's input normalization (torch-free)
WHITE = 255


class Binarize(A.ImageOnlyTransform):
    """Otsu threshold: a clean black-and-white scan look. Deterministic, so it needs no params."""

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        gray = img if img.ndim == 2 else img[..., 0]
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        return out.reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def _finish() -> list:
    return [A.Normalize(mean=(MEAN,), std=(STD,), max_pixel_value=255.0), ToTensorV2()]


def train_transform() -> A.Compose:
    """Light augmentation of printed formulas (size kept), then normalization."""
    return A.Compose([
        A.Affine(scale=(0.95, 1.02), rotate=(-1.5, 1.5), shear=(-3, 3), translate_percent=(-0.01, 0.01),
                 border_mode=cv2.BORDER_CONSTANT, fill=WHITE, p=0.4),
        A.GridDistortion(num_steps=4, distort_limit=(-0.08, 0.08), border_mode=cv2.BORDER_CONSTANT,
                         fill=WHITE, p=0.2),
        A.RandomBrightnessContrast(brightness_limit=(-0.15, 0.1), contrast_limit=(-0.2, 0.1), p=0.3),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.2, 0.7), p=0.15),
        A.GaussNoise(std_range=(0.02, 0.06), p=0.2),
        A.ImageCompression(quality_range=(60, 95), p=0.2),
        Binarize(p=0.05),
        *_finish(),
    ])


def test_transform() -> A.Compose:
    """Normalization only (validation, test, prediction)."""
    return A.Compose(_finish())


def get_transform(name: str) -> A.Compose:
    if name == "train":
        return train_transform()
    if name == "test":
        return test_transform()
    raise ValueError(f"unknown transform {name!r}: use 'train' or 'test'")


def seed_transform(transform: A.Compose, seed: int) -> None:
    """Make what `transform` does next a pure function of `seed` (one shared generator pair)."""
    seed = int(seed) % 2**63
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
