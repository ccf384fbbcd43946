"""A small real dataset in ImageFolder layout, from scikit-learn's bundled handwritten digits.

1,797 scans of handwritten digits (8x8, 17 grey levels) ship inside scikit-learn, so the demo and
the tests have real data without any download. Each is upscaled and written as an RGB JPEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_dataset(root: str | Path, train_per_class: int = 140, val_per_class: int = 30,
                         size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write ``root/{train,val}/{0..9}/*.jpg``; returns the image count per split.

    The split is a seeded per-class shuffle, so train and val never share an image.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        if train_per_class + val_per_class > len(indices):
            raise ValueError(f"class {label} has {len(indices)} images, fewer than "
                             f"train_per_class + val_per_class = {train_per_class + val_per_class}")
        for split, chosen in (("val", indices[:val_per_class]),
                              ("train", indices[val_per_class:val_per_class + train_per_class])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                grey = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(255 - grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                image.convert("RGB").save(folder / f"digit_{i:04d}.jpg", quality=95)
                counts[split] += 1
    return counts
