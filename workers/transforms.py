"""Image transforms: decode and crop on the CPU into uint8, normalise and light on the device.

Keeping CPU output uint8 quarters the bytes moved to the accelerator and skips the float
conversion, the slowest part of torchvision's usual path. Every random choice comes from a
generator seeded by the sample's position in the epoch, so a sample gets the same crop on any
rank, in any DataLoader worker, after any restart.

JPEG decoding uses libjpeg's DCT scaling (``Image.draft``): when the crop is at least twice the
output size the image is decoded at 1/2, 1/4 or 1/8 scale, which is several times cheaper.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (as in the paper's "fancy PCA" colour augmentation).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class CorruptSample(Exception):
    """A sample that cannot be decoded; the loader skips and counts it."""


def _open(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > 4 * Image.MAX_IMAGE_PIXELS:
            raise CorruptSample(f"image of {image.width}x{image.height} pixels refused")
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSample(str(e)) from None


def _decoded(image: Image.Image, scale: float) -> tuple[Image.Image, float, float]:
    """Decode to RGB, at 1/2, 1/4 or 1/8 size when ``scale`` (source pixels per output pixel) allows.

    Returns the image and the factors that map full-size coordinates onto it.
    """
    full_w, full_h = image.size
    if image.format == "JPEG" and scale >= 2:
        reduce = 1 << min(3, int(math.log2(scale)))
        image.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
    try:
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptSample(str(e)) from None
    return image, image.width / full_w, image.height / full_h


def _crop(image: Image.Image, sx: float, sy: float, box, out_w: int, out_h: int) -> Image.Image:
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=scaled, reducing_gap=None)


def _decode_region(image: Image.Image, box, out_w: int, out_h: int) -> Image.Image:
    """Crop ``box`` (full-size pixels) resized to (out_w, out_h), decoding no more than needed."""
    scale = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    decoded, sx, sy = _decoded(image, scale)
    return _crop(decoded, sx, sy, box, out_w, out_h)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box choice, with our generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return (x, y, x + w, y + h)
    # Fallback: central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return (x, y, x + w, y + h)


def train_image(data: bytes, size: int, rng: np.random.Generator, min_area: float = 0.08) -> np.ndarray:
    """Decode, RandomResizedCrop to ``size``, random horizontal flip: HWC uint8."""
    image = _open(data)
    box = random_resized_crop_box(image.width, image.height, rng, scale=(min_area, 1.0))
    out = _decode_region(image, box, size, size)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def eval_boxes(width: int, height: int, size: int, resize: int, ten_crop: bool) -> list[tuple[float, ...]]:
    """Centre crop (or the paper's 10 crops: corners + centre, flips added by the caller) after
    resizing the short side to ``resize``, expressed as boxes in the original image."""
    scale = min(width, height) / resize  # original pixels per resized pixel
    side = size * scale
    cx, cy = width / 2, height / 2
    centre = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if not ten_crop:
        return [centre]
    return [centre, (0, 0, side, side), (width - side, 0, width, side), (0, height - side, side, height),
            (width - side, height - side, width, height)]


def eval_image(data: bytes, size: int, resize: int, ten_crop: bool = False) -> np.ndarray:
    """Resize + centre crop, HWC uint8; with ``ten_crop`` an (10, H, W, C) stack (5 crops and their flips)."""
    image = _open(data)
    boxes = eval_boxes(image.width, image.height, size, resize, ten_crop)
    decoded, sx, sy = _decoded(image, (boxes[0][2] - boxes[0][0]) / size)
    crops = [np.asarray(_crop(decoded, sx, sy, box, size, size), dtype=np.uint8) for box in boxes]
    if not ten_crop:
        return crops[0]
    return np.stack(crops + [c[:, ::-1] for c in crops])


def lighting_alphas(rng: np.random.Generator, std: float) -> np.ndarray:
    return rng.normal(0.0, std, size=3).astype(np.float32) if std > 0 else np.zeros(3, np.float32)


def to_model_input(images: torch.Tensor, alphas: torch.Tensor | None = None,
                   channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW (already on the device) -> normalised float, plus PCA lighting when ``alphas`` is given."""
    x = images.to(dtype=torch.float32).div_(255.0)
    if alphas is not None:
        eigvec = torch.tensor(PCA_EIGVEC, device=x.device)
        eigval = torch.tensor(PCA_EIGVAL, device=x.device)
        shift = (alphas.to(x.device, torch.float32) * eigval) @ eigvec.T  # (N, 3) RGB offsets
        x.add_(shift[:, :, None, None])
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[None, :, None, None]
    x = x.sub_(mean).div_(std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
