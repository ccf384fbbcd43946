"""A small real dataset in ImageFolder layout, from scikit-learn's bundled handwritten digits.

1,797 scans of handwritten digits (8x8, 17 grey levels) ship inside scikit-learn, so the demo and
the tests have real data without any download. Each is upscaled, dark ink on white, and written
as an RGB JPEG: ``root/{train,val}/{0..9}/digit_<index>.JPEG``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_dataset(root: str | Path, train_per_class: int = 140, val_per_class: int = 30, size: int = 32,
                         seed: int = 0, quality: int = 92,
                         classes: Iterable[int] | None = None) -> dict[str, list[tuple[str, str]]]:
    """Write the dataset; returns, per split, the sorted (relative path, class) pairs written.

    The split is a seeded shuffle per class: val takes the first ``val_per_class`` scans, train the
    next ``train_per_class``, so they never overlap. Each digit has at least 174 scans.
    ``classes`` keeps only those digits (e.g. 0-4 to pre-train and 5-9 to fine-tune on); a digit's
    images are the same whichever other digits are kept.
    """
    from sklearn.datasets import load_digits

    if train_per_class < 0 or val_per_class < 0:
        raise ValueError("per-class counts must not be negative")
    wanted = set(range(10) if classes is None else classes)
    if not wanted or not wanted <= set(range(10)):
        raise ValueError(f"classes must be digits 0-9, got {sorted(wanted)}")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)  # for every digit, kept or not: the seeded draws stay the same
        if label not in wanted:
            continue
        if train_per_class + val_per_class > len(indices):
            raise ValueError(f"digit {label} has {len(indices)} scans, fewer than "
                             f"train_per_class + val_per_class = {train_per_class + val_per_class}")
        chosen = {"val": indices[:val_per_class], "train": indices[val_per_class:val_per_class + train_per_class]}
        for split, picked in chosen.items():
            if not len(picked):
                continue
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in picked:
                grey = (255.0 - digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(grey, "L").resize((size, size), Image.Resampling.BICUBIC)
                rel = f"{split}/{label}/digit_{int(index):04d}.JPEG"
                image.convert("RGB").save(root / rel, format="JPEG", quality=quality)
                splits[split].append((rel, str(label)))
    return {split: sorted(rows) for split, rows in splits.items() if rows}
