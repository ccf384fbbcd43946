"""Small ImageNet-layout datasets made from real photographs, and awkward files for robustness tests.

Every image is derived from the two photographs bundled with scikit-learn
(``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 427x640 each): a random crop,
scaled to an ImageNet-like size, flipped, colour-jittered, with a little sensor-like noise, and
encoded as a JPEG of quality 85-92. Each class has its own hue rotation and its own favourite crop
region, so a model can tell the classes apart. Everything is deterministic for a seed, and each image
depends only on (seed, split, class, index), so changing the counts never changes other images.

Nothing here depends on pytest: the functions can be reused by demos and benchmarks.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BROKEN_EXTRA_KINDS",
    "DatasetInfo",
    "ExtraFile",
    "IMAGENET_FIRST_SYNSETS",
    "VALID_EXTRA_KINDS",
    "make_imagenet_layout",
    "make_kaggle_val_layout",
    "render_photo",
    "write_cmyk_jpeg",
    "write_corrupt_jpeg",
    "write_decompression_bomb",
    "write_digits_dataset",
    "write_exif_rotated_jpeg",
    "write_grayscale_jpeg",
    "write_png_named_jpeg",
    "write_text_file",
    "write_truncated_jpeg",
    "write_zero_byte",
]

# The first ten ImageNet-1k synsets in sorted wnid order, as in LOC_synset_mapping.txt.
IMAGENET_FIRST_SYNSETS: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
)
_KNOWN_SYNSETS = dict(IMAGENET_FIRST_SYNSETS)

# Awkward files that a robust loader should accept (converting to RGB / applying EXIF orientation).
VALID_EXTRA_KINDS: tuple[str, ...] = ("cmyk", "grayscale", "png", "png_rgba", "exif_rotated")
# Awkward files that a robust loader should reject with a reason. "bomb" is also available but only
# when asked for by name (a careless decoder would need gigabytes for it).
BROKEN_EXTRA_KINDS: tuple[str, ...] = ("truncated", "zero_byte", "text", "corrupt")
_ALL_EXTRA_KINDS = VALID_EXTRA_KINDS + BROKEN_EXTRA_KINDS + ("bomb",)

_SPLIT_CODE = {"train": 1, "val": 2, "extra": 3}


@dataclass(frozen=True)
class ExtraFile:
    """One awkward file written into a dataset by ``extras=``."""

    path: str  # relative to the dataset root, POSIX separators
    class_name: str
    kind: str  # one of VALID_EXTRA_KINDS, BROKEN_EXTRA_KINDS or "bomb"
    valid: bool  # True when a robust loader should keep it (it is then also listed in ``splits``)
    split: str = "train"


@dataclass
class DatasetInfo:
    """What a dataset factory wrote.

    ``splits[split]`` lists ``(relative path, class name)`` for every image a robust loader should keep
    (relative to ``root``, POSIX separators, sorted by path). ``extras`` lists the awkward files
    written on request, including the broken ones, which are not in ``splits``.
    """

    root: Path
    classes: list[str]  # sorted class folder names; the index in this list is the class index
    splits: dict[str, list[tuple[str, str]]]
    extras: list[ExtraFile] = field(default_factory=list)
    synsets: dict[str, str] = field(default_factory=dict)  # class name -> human-readable description
    layout: str = "imagenet"  # "imagenet", "kaggle" or "imagefolder"

    @property
    def counts(self) -> dict[str, int]:
        """Number of valid images per split."""
        return {split: len(items) for split, items in self.splits.items()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def train(self) -> list[tuple[str, str]]:
        return self.splits.get("train", [])

    @property
    def val(self) -> list[tuple[str, str]]:
        return self.splits.get("val", [])

    @property
    def broken(self) -> list[ExtraFile]:
        """The extras a robust loader should reject."""
        return [e for e in self.extras if not e.valid]

    def paths(self, split: str) -> list[Path]:
        """Absolute paths of the valid images of a split."""
        return [self.root / rel for rel, _ in self.splits.get(split, [])]

    def labels(self, split: str) -> dict[str, str]:
        """relative path -> class name for the valid images of a split."""
        return dict(self.splits.get(split, []))


# --------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=1)
def _source_photos() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_images

    photos = tuple(Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in load_sample_images().images)
    for photo in photos:
        photo.load()
    return photos


def _hue_rotation(angle: float) -> np.ndarray:
    """3x3 matrix rotating RGB colours about the grey axis by ``angle`` radians."""
    u = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    c, s = math.cos(angle), math.sin(angle)
    return c * np.eye(3) + s * cross + (1.0 - c) * np.outer(u, u)


def _class_style(class_index: int, num_classes: int) -> tuple[int, float, tuple[float, float]]:
    """(source photo, hue angle, crop anchor) that make a class recognisable."""
    rng = np.random.default_rng([0x5EED, class_index])
    source = class_index % 2
    angle = 2.0 * math.pi * class_index / max(num_classes, 1)
    anchor = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
    return source, angle, anchor


def render_photo(size: tuple[int, int] = (500, 375), seed: int | Sequence[int] = 0, class_index: int = 0,
                 num_classes: int = 1, noise: float = 4.0) -> Image.Image:
    """An RGB ``PIL.Image`` of ``size`` (width, height) cut from a real photograph.

    Random crop around the class's anchor, scaled to ``size``, random flip, colour jitter on top of
    the class's hue rotation, gaussian noise of std ``noise`` (0-255 scale). Deterministic for
    ``(seed, class_index, num_classes)``.
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    rng = np.random.default_rng(seed)
    source_index, angle, (ax, ay) = _class_style(class_index, num_classes)
    photo = _source_photos()[source_index]
    src_w, src_h = photo.size

    # random crop with the target aspect ratio, centred near the class anchor
    aspect = width / height
    scale = rng.uniform(0.45, 0.9)
    crop_h = src_h * scale
    crop_w = crop_h * aspect
    if crop_w > src_w * 0.95:
        crop_w = src_w * rng.uniform(0.6, 0.95)
        crop_h = crop_w / aspect
    crop_w, crop_h = min(crop_w, src_w), min(crop_h, src_h)
    cx = np.clip(ax * src_w + rng.normal(0.0, 0.06) * src_w, crop_w / 2, src_w - crop_w / 2)
    cy = np.clip(ay * src_h + rng.normal(0.0, 0.06) * src_h, crop_h / 2, src_h - crop_h / 2)
    box = (cx - crop_w / 2, cy - crop_h / 2, cx + crop_w / 2, cy + crop_h / 2)
    image = photo.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # colour: class hue rotation + a small random hue shift, per-channel gains, contrast, brightness,
    # folded into one affine colour transform that Pillow applies (and clamps) in C
    matrix = _hue_rotation(angle + rng.normal(0.0, 0.08)) * rng.uniform(0.9, 1.1, size=3)[:, None]
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-20.0, 20.0)
    mean = matrix @ np.asarray(image.reduce(8), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    offset = (1.0 - contrast) * mean + brightness
    affine = np.concatenate([contrast * matrix, offset[:, None]], axis=1)
    image = image.convert("RGB", matrix=tuple(float(v) for v in affine.ravel()))
    if noise <= 0:
        return image
    # gaussian noise: a window of a fixed noise bank at a random offset (fast and deterministic)
    bank = _noise_bank()
    if height > bank.shape[0] or width > bank.shape[1]:
        reps = (-(-height // bank.shape[0]), -(-width // bank.shape[1]), 1)
        bank = np.tile(bank, reps)
    y0 = int(rng.integers(0, bank.shape[0] - height + 1))
    x0 = int(rng.integers(0, bank.shape[1] - width + 1))
    arr = np.asarray(image, dtype=np.float32)
    arr += bank[y0:y0 + height, x0:x0 + width] * np.float32(noise)
    np.clip(arr, 0.0, 255.0, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    return np.random.default_rng(0x401CE).standard_normal((1024, 1024, 3), dtype=np.float32)


def _jpeg_bytes(image: Image.Image, quality: int, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality), **kwargs)
    return buffer.getvalue()


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Awkward files. Each takes the destination path and returns it (as a Path).


def write_cmyk_jpeg(path: str | Path, size: tuple[int, int] = (120, 90), seed: int = 0, quality: int = 90) -> Path:
    """A CMYK JPEG (ImageNet holds 22 of them in train, 1 in val)."""
    path = _prepare(path)
    path.write_bytes(_jpeg_bytes(render_photo(size, seed=[seed, 11]).convert("CMYK"), quality))
    return path


def write_grayscale_jpeg(path: str | Path, size: tuple[int, int] = (120, 90), seed: int = 0,
                         quality: int = 90) -> Path:
    """A single-channel (mode "L") JPEG."""
    path = _prepare(path)
    path.write_bytes(_jpeg_bytes(render_photo(size, seed=[seed, 12]).convert("L"), quality))
    return path


def write_png_named_jpeg(path: str | Path, size: tuple[int, int] = (120, 90), seed: int = 0,
                         mode: str = "RGB") -> Path:
    """PNG bytes under whatever name is given (typically ``*.JPEG``). ``mode`` is "RGB" or "RGBA"."""
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
    path = _prepare(path)
    image = render_photo(size, seed=[seed, 13])
    if mode == "RGBA":
        w, h = image.size
        alpha = np.tile(np.linspace(64, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
        image.putalpha(Image.fromarray(alpha, "L"))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def write_exif_rotated_jpeg(path: str | Path, orientation: int = 6, size: tuple[int, int] = (120, 80),
                            seed: int = 0, quality: int = 90) -> Path:
    """A non-square JPEG whose EXIF Orientation tag (0x0112) is ``orientation``.

    With 5-8 the upright image has width and height swapped compared with the stored pixels.
    """
    if not 1 <= orientation <= 8:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
    if size[0] == size[1]:
        raise ValueError("size must not be square, or the rotation could not be seen in the size")
    path = _prepare(path)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.write_bytes(_jpeg_bytes(render_photo(size, seed=[seed, 14]), quality, exif=exif.tobytes()))
    return path


def write_truncated_jpeg(path: str | Path, fraction: float = 0.6, size: tuple[int, int] = (160, 120),
                         seed: int = 0, quality: int = 90) -> Path:
    """A valid JPEG cut to ``fraction`` of its bytes: the headers parse, a full decode fails
    ("image file is truncated") unless ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    path = _prepare(path)
    data = _jpeg_bytes(render_photo(size, seed=[seed, 15], noise=12.0), quality)
    cut = max(int(len(data) * fraction), _scan_start(data) + 16)
    if cut >= len(data) - 2:
        raise ValueError("image too small to truncate inside its scan data; use a larger size")
    path.write_bytes(data[:cut])
    return path


def write_zero_byte(path: str | Path) -> Path:
    """An empty file."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def write_text_file(path: str | Path, text: str | None = None) -> Path:
    """A plain-text file (not an image), whatever its name says."""
    path = _prepare(path)
    path.write_text(text if text is not None else
                    "These are my notes about the dataset, not an image.\nLine two.\n", encoding="utf-8")
    return path


def _scan_start(data: bytes) -> int:
    """Offset just after the first SOS segment of a baseline JPEG (start of entropy-coded data)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"unexpected byte at {pos} while walking JPEG markers")
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            return pos + 2 + length
        pos += 2 + length
    raise ValueError("no SOS marker found")


def write_corrupt_jpeg(path: str | Path, size: tuple[int, int] = (160, 120), seed: int = 0,
                       quality: int = 90) -> Path:
    """A JPEG with intact headers (``Image.open`` succeeds and reports the size) whose scan cannot be
    decoded: the start-of-scan header names a component the frame does not have, and the entropy-coded
    data is replaced by random bytes (no 0xFF, no EOI). ``Image.load()`` raises ``OSError`` ("broken
    data stream") with the default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.

    libjpeg treats random entropy-coded data alone only as a warning and decodes garbage, which is
    why the scan header is broken too.
    """
    path = _prepare(path)
    data = _jpeg_bytes(render_photo(size, seed=[seed, 16]), quality)
    scan = _scan_start(data)
    sos = data.rfind(b"\xff\xda", 0, scan)
    header = bytearray(data[:scan])
    # SOS layout: FF DA, length (2), component count (1), then (component id, table ids) pairs
    header[sos + 5] = 0x77  # a component id that is not in the frame header
    rng = np.random.default_rng([seed, 17])
    garbage = rng.integers(0, 0xFF, size=max((len(data) - scan) // 2, 64), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(header) + garbage)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_decompression_bomb(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` (default 400 M pixels, more than Pillow's
    2 x ``MAX_IMAGE_PIXELS`` = 178,956,970, so ``Image.open`` raises ``DecompressionBombError``).

    The file is about 50 KB. It is compressed row block by row block, so writing it needs little
    memory; decoding it fully would need ``width * height`` bytes.
    """
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    path = _prepare(path)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "None" + all-black pixels
    rows_per_block = max(1, (4 << 20) // len(row))
    compressor = zlib.compressobj(9)
    parts = [b""]
    done = 0
    while done < height:
        n = min(rows_per_block, height - done)
        parts.append(compressor.compress(row * n))
        done += n
    parts.append(compressor.flush())
    idat = b"".join(parts)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", header))
        f.write(_png_chunk(b"IDAT", idat))
        f.write(_png_chunk(b"IEND", b""))
    return path


_EXTRA_WRITERS = {
    "cmyk": lambda p, s: write_cmyk_jpeg(p, size=(96, 72), seed=s),
    "grayscale": lambda p, s: write_grayscale_jpeg(p, size=(96, 72), seed=s),
    "png": lambda p, s: write_png_named_jpeg(p, size=(96, 72), seed=s),
    "png_rgba": lambda p, s: write_png_named_jpeg(p, size=(96, 72), seed=s, mode="RGBA"),
    "exif_rotated": lambda p, s: write_exif_rotated_jpeg(p, size=(96, 64), seed=s),
    "truncated": lambda p, s: write_truncated_jpeg(p, seed=s),
    "zero_byte": lambda p, s: write_zero_byte(p),
    "text": lambda p, s: write_text_file(p),
    "corrupt": lambda p, s: write_corrupt_jpeg(p, seed=s),
    "bomb": lambda p, s: write_decompression_bomb(p),
}


# --------------------------------------------------------------------------------------------------
# Dataset factories


def _class_names(classes: int | Sequence[str], wnids: bool) -> list[str]:
    if isinstance(classes, int):
        if classes < 1:
            raise ValueError("classes must be at least 1")
        if wnids:
            names = [wnid for wnid, _ in IMAGENET_FIRST_SYNSETS[:classes]]
            names += [f"n{90000000 + i:08d}" for i in range(len(names), classes)]
            return names
        return [f"class_{i:03d}" for i in range(classes)]
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in {names!r}")
    for name in names:
        if not name or "/" in name or name in (".", "..") or name.startswith("."):
            raise ValueError(f"unusable class folder name {name!r}")
    return sorted(names)


def _describe(name: str, index: int) -> str:
    if name in _KNOWN_SYNSETS:
        return _KNOWN_SYNSETS[name]
    if re.fullmatch(r"n\d{8}", name):
        return f"synthetic class {index}"
    return name


def _image_size(rng: np.random.Generator, size: tuple[int, int], portrait_fraction: float,
                size_jitter: float) -> tuple[int, int]:
    w, h = size
    if portrait_fraction > 0 and rng.random() < portrait_fraction:
        w, h = h, w
    if size_jitter > 0:
        w = round(w * rng.uniform(1.0 - size_jitter, 1.0 + size_jitter))
        h = round(h * rng.uniform(1.0 - size_jitter, 1.0 + size_jitter))
    return max(int(w), 8), max(int(h), 8)


def _write_image(path: Path, seed: int, split: str, class_index: int, num_classes: int, i: int,
                 size: tuple[int, int], portrait_fraction: float, size_jitter: float) -> None:
    key = [seed, _SPLIT_CODE[split], class_index, i]
    rng = np.random.default_rng(key + [1])
    image_size = _image_size(rng, size, portrait_fraction, size_jitter)
    image = render_photo(image_size, seed=key, class_index=class_index, num_classes=num_classes)
    path.write_bytes(_jpeg_bytes(image, int(rng.integers(85, 93))))


def _extra_kinds(extras: bool | Iterable[str]) -> list[str]:
    if extras is True:
        return list(VALID_EXTRA_KINDS + BROKEN_EXTRA_KINDS)
    if extras is False or extras is None:
        return []
    kinds = list(extras)
    unknown = sorted(set(kinds) - set(_ALL_EXTRA_KINDS))
    if unknown:
        raise ValueError(f"unknown extra kinds {unknown}; choose from {list(_ALL_EXTRA_KINDS)}")
    return kinds


def _build(root: Path, classes: int | Sequence[str], train_per_class: int, val_per_class: int,
           size: tuple[int, int], seed: int, wnids: bool, extras: bool | Iterable[str], synset_mapping: bool,
           portrait_fraction: float, size_jitter: float, flat_val: bool) -> DatasetInfo:
    if train_per_class < 0 or val_per_class < 0:
        raise ValueError("per-class counts must not be negative")
    root = Path(root)
    names = _class_names(classes, wnids)
    num_classes = len(names)
    kinds = _extra_kinds(extras)
    extras_of: dict[int, list[str]] = {}
    for j, kind in enumerate(kinds):
        extras_of.setdefault(j % num_classes, []).append(kind)

    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, str]]] = {}
    extra_files: list[ExtraFile] = []

    # train: root/train/<class>/<class>_<number>.JPEG, numbers sparse and random like ImageNet's
    if train_per_class > 0 or kinds:
        rows: list[tuple[str, str]] = []
        for ci, name in enumerate(names):
            folder = root / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            mine = extras_of.get(ci, [])
            total = train_per_class + len(mine)
            rng = np.random.default_rng([seed, 7, ci])
            numbers = np.sort(rng.choice(max(10 * total, 2000), size=total, replace=False) + 1)
            regular, extra_numbers = numbers[:train_per_class], numbers[train_per_class:]
            for i, number in enumerate(regular):
                rel = f"train/{name}/{name}_{int(number)}.JPEG"
                _write_image(root / rel, seed, "train", ci, num_classes, i, size, portrait_fraction, size_jitter)
                rows.append((rel, name))
            for kind, number in zip(mine, extra_numbers):
                rel = f"train/{name}/{name}_{int(number)}.JPEG"
                _EXTRA_WRITERS[kind](root / rel, seed * 1000 + int(number))
                valid = kind in VALID_EXTRA_KINDS
                extra_files.append(ExtraFile(rel, name, kind, valid))
                if valid:
                    rows.append((rel, name))
        splits["train"] = sorted(rows)

    # val: ILSVRC2012_val_<n>.JPEG with numbers shuffled across classes, as in the real val set
    if val_per_class > 0:
        total = val_per_class * num_classes
        order = np.random.default_rng([seed, 8]).permutation(total) + 1
        rows = []
        for ci, name in enumerate(names):
            folder = root / "val" if flat_val else root / "val" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(val_per_class):
                number = int(order[ci * val_per_class + i])
                rel = (folder / f"ILSVRC2012_val_{number:08d}.JPEG").relative_to(root).as_posix()
                _write_image(root / rel, seed, "val", ci, num_classes, i, size, portrait_fraction, size_jitter)
                rows.append((rel, name))
        splits["val"] = sorted(rows)

    synsets = {name: _describe(name, i) for i, name in enumerate(names)}
    if synset_mapping:
        lines = [f"{name} {synsets[name]}\n" for name in names]
        (root / "LOC_synset_mapping.txt").write_text("".join(lines), encoding="utf-8")
    return DatasetInfo(root=root, classes=names, splits=splits, extras=extra_files, synsets=synsets,
                       layout="kaggle" if flat_val else "imagenet")


def make_imagenet_layout(root: str | Path, classes: int | Sequence[str] = 3, train_per_class: int = 8,
                         val_per_class: int = 2, size: tuple[int, int] = (500, 375), seed: int = 0,
                         wnids: bool = True, extras: bool | Iterable[str] = False, synset_mapping: bool = False,
                         portrait_fraction: float = 0.2, size_jitter: float = 0.1) -> DatasetInfo:
    """Write ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    ``classes``: a count (folders named like ImageNet wnids, the real first ten then ``n9000xxxx``;
    with ``wnids=False`` ``class_000``...) or a list of folder names. Train files are named
    ``<class>_<number>.JPEG``, val files ``ILSVRC2012_val_<8 digits>.JPEG``. A split with 0 images per
    class is not created.

    ``size`` is (width, height); each image is turned to portrait with probability
    ``portrait_fraction`` and each side scaled by up to +-``size_jitter``. Pass
    ``portrait_fraction=0, size_jitter=0`` for exact sizes.

    ``extras``: True adds one file of each kind in ``VALID_EXTRA_KINDS`` and ``BROKEN_EXTRA_KINDS`` to
    train (spread over the classes, named like the other train files); an iterable of kinds picks them
    (``"bomb"`` only this way). Valid extras are listed in ``splits``; all are in ``extras``.

    ``synset_mapping`` writes ``root/LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca").
    """
    return _build(Path(root), classes, train_per_class, val_per_class, tuple(size), seed, wnids, extras,
                  synset_mapping, portrait_fraction, size_jitter, flat_val=False)


def make_kaggle_val_layout(root: str | Path, classes: int | Sequence[str] = 3, train_per_class: int = 8,
                           val_per_class: int = 2, size: tuple[int, int] = (500, 375), seed: int = 0,
                           extras: bool | Iterable[str] = False, synset_mapping: bool = True,
                           portrait_fraction: float = 0.2, size_jitter: float = 0.1,
                           boxes_per_image: tuple[int, int] = (1, 2)) -> DatasetInfo:
    """The Kaggle ImageNet layout: ``root/train/<wnid>/*.JPEG`` as usual, a flat ``root/val/*.JPEG``,
    and ``root/LOC_val_solution.csv`` with the labels.

    The CSV has the header ``ImageId,PredictionString``; ``ImageId`` is the file name without
    extension, ``PredictionString`` is ``"<wnid> x1 y1 x2 y2"`` repeated for each box (all boxes of an
    image carry the same wnid, the first token is the label). Rows are in shuffled order.
    ``synset_mapping`` (default True, as Kaggle ships it) writes ``LOC_synset_mapping.txt``.
    In ``DatasetInfo.splits["val"]`` paths are ``val/<file>`` with the class from the CSV.
    """
    info = _build(Path(root), classes, train_per_class, val_per_class, tuple(size), seed, True, extras,
                  synset_mapping, portrait_fraction, size_jitter, flat_val=True)
    for name in info.classes:
        if re.search(r"[\s,]", name):
            raise ValueError(f"class name {name!r} cannot go into LOC_val_solution.csv")
    rng = np.random.default_rng([seed, 9])
    rows = []
    for rel, name in info.val:
        path = info.root / rel
        with Image.open(path) as image:
            w, h = image.size
        boxes = []
        for _ in range(int(rng.integers(boxes_per_image[0], boxes_per_image[1] + 1))):
            x1, x2 = sorted(int(v) for v in rng.integers(0, w, size=2))
            y1, y2 = sorted(int(v) for v in rng.integers(0, h, size=2))
            boxes.append(f"{name} {x1} {y1} {max(x2, x1 + 1)} {max(y2, y1 + 1)}")
        rows.append((Path(rel).stem, " ".join(boxes) + " "))
    order = rng.permutation(len(rows))
    with open(info.root / "LOC_val_solution.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ImageId", "PredictionString"])
        for i in order:
            writer.writerow(rows[i])
    return info


# --------------------------------------------------------------------------------------------------
# Handwritten digits in ImageFolder layout


def write_digits_dataset(root: str | Path, train_per_class: int, val_per_class: int, size: int = 32,
                         seed: int = 0, quality: int = 92, classes: Iterable[int] | None = None) -> DatasetInfo:
    """The demo's handwritten-digits dataset (``data_prep.demo_data``), described as a DatasetInfo;
    ``classes`` keeps only those digits."""
    from data_prep.demo_data import write_digits_dataset as write

    splits = write(root, train_per_class, val_per_class, size=size, seed=seed, quality=quality, classes=classes)
    names = [str(d) for d in sorted(range(10) if classes is None else set(classes))]
    return DatasetInfo(root=Path(root), classes=names, splits=splits, synsets={n: n for n in names},
                       layout="imagefolder")
