"""Image transforms: decode and crop on the CPU into uint8, normalise and light on the device.

Keeping CPU output uint8 quarters the bytes moved to the accelerator and skips the float
conversion, the slowest part of torchvision's usual path. Every random choice comes from a
generator seeded by the sample's position in the epoch, so a sample gets the same crop on any
rank, on any decoding thread, after any restart.

Decoding and resizing use OpenCV: its libjpeg-turbo decoder is a little faster than Pillow's and
its SIMD resize several times faster, which together halve the CPU cost of a training sample.
When the crop is at least twice the output size, the JPEG is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling), which is cheaper still. Shrinking by more than 1.5x uses area
averaging, so it does not alias.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch

from data_prep.images import DEFAULT_MAX_PIXELS

cv2.setNumThreads(1)  # one decode per decoding thread; OpenCV's own threads would only fight over the cores

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (as in the paper's "fancy PCA" colour augmentation).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class CorruptSample(Exception):
    """A sample that cannot be decoded; the loader skips and counts it."""


_REDUCED = {1: cv2.IMREAD_COLOR_RGB, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}
# The largest image decoded: a shard made with up to 4x the default --max-pixels still trains,
# anything larger is taken for a decompression bomb.
MAX_PIXELS = 4 * DEFAULT_MAX_PIXELS


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG header, without decoding; falls back to a full decode.

    A frame header of zero width or height (legal only with a DNL marker, which libjpeg cannot
    read) makes the sample corrupt: every crop of it would be empty.
    """
    i, n = 2, len(data)
    if data[:2] == b"\xff\xd8":
        while i + 9 < n:
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                width, height = int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
                if not width or not height:
                    raise CorruptSample(f"JPEG frame header of {width}x{height} pixels")
                return width, height
            i += 2 + length
    image = _imdecode(data, 1)
    return image.shape[1], image.shape[0]


def _imdecode(data: bytes, reduce: int) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce])
    except cv2.error as e:
        raise CorruptSample(f"cannot decode image: {e}") from None
    if image is None or not image.size:
        raise CorruptSample("cannot decode image")
    if reduce != 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # the reduced modes have no RGB variant
    return image


def _decoded(data: bytes, width: int, height: int, scale: float) -> tuple[np.ndarray, float, float]:
    """RGB pixels, at 1/2, 1/4 or 1/8 size when ``scale`` (source pixels per output pixel) allows,
    and the factors that map full-size coordinates onto them."""
    if width * height > MAX_PIXELS:
        raise CorruptSample(f"image of {width}x{height} pixels refused")
    reduce = 1 << min(3, int(math.log2(scale))) if scale >= 2 else 1
    image = _imdecode(data, reduce)
    return image, image.shape[1] / width, image.shape[0] / height


def _crop(image: np.ndarray, sx: float, sy: float, box, out_w: int, out_h: int) -> np.ndarray:
    x0, y0 = int(round(box[0] * sx)), int(round(box[1] * sy))
    x1 = max(x0 + 1, min(image.shape[1], int(round(box[2] * sx))))
    y1 = max(y0 + 1, min(image.shape[0], int(round(box[3] * sy))))
    region = image[y0:y1, x0:x1]
    if not region.size:  # a header that disagrees with the pixels it decodes to
        raise CorruptSample(f"empty crop of a {image.shape[1]}x{image.shape[0]} image")
    shrink = min((x1 - x0) / out_w, (y1 - y0) / out_h)
    interpolation = cv2.INTER_AREA if shrink > 1.5 else cv2.INTER_LINEAR
    return cv2.resize(region, (out_w, out_h), interpolation=interpolation)


def decode_region(data: bytes, box, out_w: int, out_h: int) -> np.ndarray:
    """Crop ``box`` (full-size pixels) resized to (out_w, out_h), decoding no more than needed."""
    width, height = image_size(data)
    scale = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    decoded, sx, sy = _decoded(data, width, height, scale)
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
    """Decode, RandomResizedCrop to ``size``, random horizontal flip: HWC uint8 RGB."""
    width, height = image_size(data)
    box = random_resized_crop_box(width, height, rng, scale=(min_area, 1.0))
    scale = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    decoded, sx, sy = _decoded(data, width, height, scale)
    out = _crop(decoded, sx, sy, box, size, size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


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
    width, height = image_size(data)
    boxes = eval_boxes(width, height, size, resize, ten_crop)
    decoded, sx, sy = _decoded(data, width, height, (boxes[0][2] - boxes[0][0]) / size)
    crops = [_crop(decoded, sx, sy, box, size, size) for box in boxes]
    if not ten_crop:
        return crops[0]
    return np.stack(crops + [c[:, ::-1] for c in crops])


def lighting_alphas(rng: np.random.Generator, std: float) -> np.ndarray:
    return rng.normal(0.0, std, size=3).astype(np.float32) if std > 0 else np.zeros(3, np.float32)


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """PCA eigenvectors and eigenvalues, mean and std on ``device``, made once: building them each
    step would be a blocking host-to-device copy per step on a GPU."""
    return (torch.tensor(PCA_EIGVEC, device=device), torch.tensor(PCA_EIGVAL, device=device),
            torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None],
            torch.tensor(IMAGENET_STD, device=device)[None, :, None, None])


def to_model_input(images: torch.Tensor, alphas: torch.Tensor | None = None,
                   channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW (already on the device) -> normalised float, plus PCA lighting when ``alphas`` is given."""
    x = images.to(dtype=torch.float32).div_(255.0)
    eigvec, eigval, mean, std = _constants(x.device)
    if alphas is not None:
        shift = (alphas.to(x.device, torch.float32, non_blocking=True) * eigval) @ eigvec.T  # (N, 3) RGB offsets
        x.add_(shift[:, :, None, None])
    x = x.sub_(mean).div_(std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
