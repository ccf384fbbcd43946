"""An ImageNet-shaped tree, as Kaggle ships ImageNet, for measuring ``alexray shard`` at scale.

``python bench/imagenet_tree.py DEST --images 10000 [--classes 1000] [--seed 0] [--odd-every 1000]``

```
DEST/train/n01440764/n01440764_10026.JPEG   one folder per class, WordNet-id names, images per class
                                            in ImageNet's proportions (732 to 1300)
DEST/val/ILSVRC2012_val_00000001.JPEG       flat, numbered across classes, labelled by the CSV
DEST/LOC_val_solution.csv                   ImageId,PredictionString ("wnid x1 y1 x2 y2 " per box)
DEST/LOC_synset_mapping.txt                 "wnid name" per class, in wnid order
```

Kaggle's download nests ``train/`` and ``val/`` under ``ILSVRC/Data/CLS-LOC/``; here they sit beside
the two LOC files, as ``alexray shard SRC`` reads them. Of ``--images``, 3.76% go to val (50,000 of
ImageNet's 1,331,167).

Images are real JPEGs of a few KB: a bank of photo-like variants (sizes, aspect ratios, qualities)
is encoded once, and each file is one of them with a JPEG comment naming the file inserted after
the start-of-image marker, so no two files hold the same bytes and writing a million of them costs
little more than creating the files. Every ``--odd-every``-th train file is an awkward input the
sharder handles instead: CMYK, grayscale, PNG under a .JPEG name (with and without alpha) and
EXIF-rotated files are converted; truncated, empty, text and corrupt ones are rejected (4 of 9
kinds, so 0.044% of inputs at the default, under ``alexray shard``'s 0.1% limit). The same
arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import datasets as ds  # noqa: E402

VAL_SHARE = 50_000 / 1_331_167
BANK_SIZE = 96  # distinct (size, quality, content) variants
ODD_KINDS = ("cmyk", "grayscale", "png", "exif_rotated", "truncated", "png_rgba", "zero_byte", "text", "corrupt")
_ODD_WRITERS = {
    "cmyk": lambda p, s: ds.write_cmyk_jpeg(p, size=(96, 72), seed=s),
    "grayscale": lambda p, s: ds.write_grayscale_jpeg(p, size=(96, 72), seed=s),
    "png": lambda p, s: ds.write_png_named_jpeg(p, size=(96, 72), seed=s),
    "png_rgba": lambda p, s: ds.write_png_named_jpeg(p, size=(96, 72), seed=s, mode="RGBA"),
    "exif_rotated": lambda p, s: ds.write_exif_rotated_jpeg(p, size=(96, 64), seed=s),
    "truncated": lambda p, s: ds.write_truncated_jpeg(p, seed=s),
    "zero_byte": lambda p, s: ds.write_zero_byte(p),
    "text": lambda p, s: ds.write_text_file(p),
    "corrupt": lambda p, s: ds.write_corrupt_jpeg(p, seed=s),
}


def make_wnids(classes: int, rng: random.Random) -> list[tuple[str, str]]:
    """(wnid, name) per class in sorted order: ImageNet's first ten, then made-up ids that look alike."""
    synsets = list(ds.IMAGENET_FIRST_SYNSETS[:classes])
    number = int(synsets[-1][0][1:])
    while len(synsets) < classes:
        number += rng.randint(200, 9000)
        synsets.append((f"n{number:08d}", f"synthetic class {len(synsets)}"))
    return synsets


def make_bank(seed: int) -> list[tuple[bytes, int, int]]:
    """(JPEG bytes, width, height) of every variant: short side 80-288 px, aspect 1:1 to 16:9 either way."""
    rng = random.Random(f"bank:{seed}")
    bank = []
    for k in range(BANK_SIZE):
        short = rng.randrange(80, 289)
        long = round(short * rng.choice((1.0, 1.25, 1.333, 1.5, 1.778)))
        size = (long, short) if rng.random() < 0.75 else (short, long)
        image = ds.render_photo(size, seed=[seed, 99, k], class_index=k, num_classes=BANK_SIZE, noise=1.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=rng.randrange(60, 86))
        bank.append((out.getvalue(), size[0], size[1]))
    return bank


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment holding ``text`` right after the start-of-image marker."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def split_counts(total: int, weights: list[float]) -> list[int]:
    """``total`` spread over ``weights`` by largest remainder: the counts add up exactly."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def generate(dest: Path, images: int, classes: int = 1000, seed: int = 0, odd_every: int = 1000) -> dict:
    """Write the tree; returns counts. DEST must not exist or be empty."""
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"imagenet_tree: {dest} is not empty; pass a new or empty directory")
    if images < 1 or classes < 1:
        raise SystemExit("imagenet_tree: --images and --classes must be at least 1")
    rng = random.Random(seed)
    synsets = make_wnids(classes, rng)
    bank = make_bank(seed)
    n_val = round(images * VAL_SHARE)
    per_class = split_counts(images - n_val, [rng.uniform(732, 1300) for _ in synsets])

    written, odd = 0, {}
    train = dest / "train"
    for (wnid, _), count in zip(synsets, per_class):
        folder = train / wnid
        folder.mkdir(parents=True)
        numbers = sorted(rng.sample(range(1, max(50_000, 4 * count)), count))
        for number in numbers:
            name = f"{wnid}_{number}.JPEG"
            path = os.path.join(folder, name)
            written += 1
            if odd_every and written % odd_every == 0:
                kind = ODD_KINDS[(written // odd_every - 1) % len(ODD_KINDS)]
                _ODD_WRITERS[kind](path, seed * 1_000_003 + written)
                odd[kind] = odd.get(kind, 0) + 1
                continue
            jpeg, _, _ = bank[rng.randrange(len(bank))]
            _write(path, with_comment(jpeg, f"train/{wnid}/{name}"))

    val = dest / "val"
    val.mkdir(parents=True)
    order = list(range(1, n_val + 1))
    rng.shuffle(order)
    rows = []
    for i, number in enumerate(order):
        wnid = synsets[i % classes][0]
        name = f"ILSVRC2012_val_{number:08d}"
        jpeg, width, height = bank[rng.randrange(len(bank))]
        _write(os.path.join(val, f"{name}.JPEG"), with_comment(jpeg, f"val/{name}.JPEG"))
        boxes = []
        for _ in range(rng.randint(1, 2)):
            x1, x2 = sorted(rng.randrange(width) for _ in range(2))
            y1, y2 = sorted(rng.randrange(height) for _ in range(2))
            boxes.append(f"{wnid} {x1} {y1} {max(x2, x1 + 1)} {max(y2, y1 + 1)}")
        rows.append((name, " ".join(boxes) + " "))
    rng.shuffle(rows)
    with open(dest / "LOC_val_solution.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    (dest / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in synsets), encoding="utf-8")
    return {"train": written, "val": n_val, "classes": classes, "odd": odd}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, metavar="DEST", help="a new or empty directory")
    p.add_argument("--images", type=int, required=True, help="train + val images")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--odd-every", type=int, default=1000, help="every Nth train file is an awkward one (0: none)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    counts = generate(args.dest, args.images, args.classes, args.seed, args.odd_every)
    seconds = time.perf_counter() - started
    n = counts["train"] + counts["val"]
    size = sum(e.stat().st_size for d in ("train", "val") for e in _walk(args.dest / d))
    print(f"{args.dest}: {counts['train']} train + {counts['val']} val images in {counts['classes']} classes, "
          f"{size / 1e6:.1f} MB, odd files {counts['odd']}; {seconds:.1f} s ({n / seconds:.0f} files/s)")
    return 0


def _walk(folder: Path):
    for entry in os.scandir(folder):
        if entry.is_dir():
            yield from _walk(Path(entry.path))
        else:
            yield entry


if __name__ == "__main__":
    sys.exit(main())
