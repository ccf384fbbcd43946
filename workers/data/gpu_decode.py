"""Decode and augment batches on the device: nvJPEG on CUDA, libjpeg-turbo when the device is the CPU.

The CPU threads only read tar members and parse JPEG headers: the image size is in the
start-of-frame marker, so crop boxes and flips are drawn, from the same per-sample generators and
in the same order as ``transforms.train_image``, without decoding a pixel. A background thread
then decodes each step's JPEGs in one ``decode_jpeg`` call, crops and resizes every box with one
``roi_align`` (adaptive sampling: a bin covering several source pixels averages a grid of
bilinear samples, so downscaling does not alias), flips, and rounds to uint8; lighting and
normalisation stay in ``transforms.to_model_input``. On CUDA that thread works on its own stream
from pinned host buffers, so the next batch is ready while the current step runs.

Only the resampling filter differs from the CPU path: same samples, keys, labels, boxes, flips
and lighting draws, so resume and the sample log do not depend on the decode path. Whatever the
device decoder cannot take (no JPEG header, CMYK, 12-bit or arithmetic-coded JPEGs) is decoded by
the CPU path on the header threads; a JPEG the decoder refuses is retried alone, then decoded by
OpenCV; what OpenCV refuses too is skipped and counted, like on the CPU path.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

from alexray_core.spec import SpecError
from workers.data.loader import (
    Batch,
    SplitInfo,
    ThreadedTrainLoader,
    eval_segments,
    log_skipped,
    read_segments,
    sample_parts,
)
from workers.data.sampling import EpochPlan, RankSlice, rank_slices
from workers.data.transforms import (
    MAX_PIXELS,
    CorruptSample,
    decode_region,
    eval_boxes,
    eval_image,
    lighting_alphas,
    random_resized_crop_box,
    train_image,
)

log = logging.getLogger(__name__)
DECODE_CHOICES = ("auto", "cpu", "gpu")
# Frames the device decoder handles: baseline, extended and progressive Huffman, 8 bits.
_DEVICE_FRAMES = (0xC0, 0xC1, 0xC2)
_UNDECODABLE = (CorruptSample, ValueError, cv2.error)

# torchvision 0.29 announces that TorchCodec will take over its decoders; the call is unchanged.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode_on_device(choice: str, device: torch.device | str) -> bool:
    """``data.decode`` resolved for training (or evaluating) on ``device``: whether batches come from
    this module.

    ``cpu``: never. ``auto``: on a CUDA device whose JPEG decoder works, else the CPU path (with a
    warning when a GPU's decoder does not work). ``gpu``: whatever the device, so on a CPU-only
    worker this module runs on the CPU (torchvision's libjpeg-turbo decoder stands in for nvJPEG:
    what the tests check); a SpecError naming the problem when the device's decoder does not work,
    rather than a run that decodes every image a second time on the CPU.
    """
    if choice not in DECODE_CHOICES:
        raise ValueError(f"data.decode: {choice!r} is not one of {', '.join(DECODE_CHOICES)}")
    device = torch.device(device)
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return False
    problem = device_decoder_problem(str(_indexed(device)))
    if problem is None:
        return True
    if choice == "gpu":
        raise SpecError(f"data.decode: gpu, but {problem}; set data.decode: cpu (or auto, which falls back to it)")
    log.warning("data.decode: auto decodes on the CPU: %s", problem)
    return False


def decode_jpeg(*args, **kwargs):
    """``torchvision.io.decode_jpeg``, imported when first called: importing torchvision loads torch's
    compiler (2-3 s of every worker's start-up), which a run that decodes on the CPU never needs."""
    from torchvision.io import decode_jpeg as decode

    return decode(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def device_decoder_problem(device: str) -> str | None:
    """Why ``decode_jpeg`` cannot decode on ``device`` (a torchvision built without nvJPEG, a driver
    too old for it), or None when it decodes a small JPEG there correctly."""
    from torchvision.io import ImageReadMode, encode_jpeg

    probe = torch.zeros((3, 16, 16), dtype=torch.uint8)
    probe[0] = 200
    try:
        data = encode_jpeg(probe, quality=95)
        decoded = decode_jpeg([data], mode=ImageReadMode.RGB, device=torch.device(device))[0]
        if tuple(decoded.shape) != (3, 16, 16) or abs(int(decoded[0].float().mean().item()) - 200) > 8:
            return f"the JPEG decoder on {device} returned wrong pixels"
    except Exception as e:  # noqa: BLE001 - whatever the reason, the answer is: not on this device
        return f"the JPEG decoder does not work on {device} ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
    return None


def _indexed(device) -> torch.device:
    """``device`` with its index: streams and the decoding thread need to name the GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    frame: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...

    @property
    def device_decodable(self) -> bool:
        return self.frame in _DEVICE_FRAMES and self.components in (1, 3) and self.precision == 8

    def check(self) -> None:
        """CorruptSample where the CPU path refuses the image from its header alone."""
        if not self.width or not self.height:
            raise CorruptSample(f"JPEG frame header of {self.width}x{self.height} pixels")
        if self.width * self.height > MAX_PIXELS:
            raise CorruptSample(f"image of {self.width}x{self.height} pixels refused")


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The start-of-frame fields, walking the markers as ``transforms.image_size`` does; None when
    that walk finds no frame (not a JPEG, or broken markers: the CPU path decodes those)."""
    i, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return JpegHeader(width=int.from_bytes(data[i + 7:i + 9], "big"),
                              height=int.from_bytes(data[i + 5:i + 7], "big"),
                              components=data[i + 9], precision=data[i + 4], frame=marker)
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


# ---- the device stage -----------------------------------------------------------------------------

def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) images on ``device``; None for a JPEG the decoder refuses.

    One call for the batch; it fails as a whole on one bad image, so a failure is retried image by
    image. The bytes are gathered into one (on CUDA pinned) buffer that the decoder reads from.
    """
    from torchvision.io import ImageReadMode

    if not datas:
        return []
    offsets = np.cumsum([0] + [len(d) for d in datas])
    buffer = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = buffer.numpy()
    for data, start in zip(datas, offsets):
        flat[start:start + len(data)] = np.frombuffer(data, np.uint8)
    views = [buffer[offsets[k]:offsets[k + 1]] for k in range(len(datas))]
    try:
        return list(decode_jpeg(views, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for view in views:
        try:
            out.append(decode_jpeg(view, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def crop_resize(images: list[torch.Tensor], boxes: np.ndarray, owners: np.ndarray, size: int,
                max_elements: int = 1 << 25) -> torch.Tensor:
    """Float (R, 3, size, size) crops: box ``r`` (x0, y0, x1, y1 in pixel edges) of ``images[owners[r]]``.

    Images are padded into canvases (one extra row and column repeating the edge, so a box that
    touches the border samples the border, as OpenCV's resize does) and cropped by one
    ``roi_align`` per canvas; canvases hold at most ``max_elements`` floats (sorted by size, so
    similar images share one).
    """
    from torchvision.ops import roi_align

    device = images[0].device
    out: torch.Tensor | None = None
    order = sorted(range(len(images)), key=lambda k: (images[k].shape[1], images[k].shape[2]))
    start = 0
    while start < len(order):
        stop, height, width = start, 0, 0
        while stop < len(order):
            h, w = images[order[stop]].shape[1:]
            grown = (max(height, h + 1), max(width, w + 1))
            if stop > start and (stop - start + 1) * 3 * grown[0] * grown[1] > max_elements:
                break
            height, width, stop = grown[0], grown[1], stop + 1
        members = order[start:stop]
        canvas = torch.empty((len(members), 3, height, width), dtype=torch.uint8, device=device)
        for slot, k in enumerate(members):
            canvas[slot, :, :images[k].shape[1], :images[k].shape[2]] = images[k]
        # The edge column, then the edge row (corner included), of every image at once.
        slots = torch.arange(len(members), device=device)
        hs, ws = (torch.tensor([images[k].shape[d] for k in members], device=device) for d in (1, 2))
        canvas[slots, :, :, ws] = canvas[slots, :, :, ws - 1]
        canvas[slots, :, hs, :] = canvas[slots, :, hs - 1, :]
        slot_of = {k: slot for slot, k in enumerate(members)}
        rows = [r for r in range(len(boxes)) if int(owners[r]) in slot_of]
        rois = np.empty((len(rows), 5), np.float32)
        rois[:, 0] = [slot_of[int(owners[r])] for r in rows]
        rois[:, 1:] = boxes[rows]
        crops = roi_align(canvas.float(), torch.from_numpy(rois).to(device), (size, size), spatial_scale=1.0,
                          sampling_ratio=0, aligned=True)
        if start == 0 and stop == len(order):
            return crops  # one canvas held them all: rows are already in order
        if out is None:
            out = torch.empty((len(boxes), 3, size, size), dtype=torch.float32, device=device)
        out.index_copy_(0, torch.tensor(rows, device=device), crops)
        start = stop
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.round_().clamp_(0, 255).to(torch.uint8)


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ---- training ---------------------------------------------------------------------------------------

@dataclass
class HostBatch:
    """One step's samples as the header threads leave them: JPEG bytes and boxes for the device,
    or pixels the CPU path already made; ``keys[i] is None`` marks a sample skipped."""

    step: int
    jpegs: list[bytes | None]
    boxes: np.ndarray  # (N, 4) full-size pixel edges
    sizes: np.ndarray  # (N, 2) height and width from the JPEG header
    flips: np.ndarray  # (N,) bool
    labels: np.ndarray
    alphas: np.ndarray
    keys: list[str | None]
    skipped: int
    ready: dict[int, np.ndarray] = field(default_factory=dict)  # row -> HWC uint8, flipped already


class _HeaderBuffer:
    """One step's HostBatch, filled in place by the header threads."""

    def __init__(self, step: int, size: int, parts: int):
        self.host = HostBatch(step, [None] * size, np.zeros((size, 4), np.float32), np.zeros((size, 2), np.int64),
                              np.zeros(size, bool), np.zeros(size, np.int64), np.zeros((size, 3), np.float32),
                              [None] * size, 0)
        self.remaining = parts

    @property
    def skipped(self) -> int:
        return self.host.skipped

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.host.skipped = value

    def batch(self) -> HostBatch:
        return self.host


class HeaderLoader(ThreadedTrainLoader):
    """``ThreadedTrainLoader``'s streams, steps and threads, with header parsing in place of decoding."""

    def _new_buffer(self, step: int) -> _HeaderBuffer:
        return _HeaderBuffer(step, self.offsets[-1], len(self.slices))

    def _fill(self, buffer: _HeaderBuffer, cursor, step: int, sl: RankSlice, offset: int) -> int:
        host, skipped = buffer.host, 0
        for j, position in enumerate(range(step * self.plan.chunk + sl.lo, step * self.plan.chunk + sl.hi)):
            sample = cursor.get(position)
            # The generator and the order of its draws are the CPU path's (train_image, then lighting).
            rng = np.random.default_rng((self.seed, self.plan.epoch, sl.stream, position))
            row = offset + j
            try:
                data, label = sample_parts(sample, self.split.num_classes)
                self._draw(host, row, data, rng)
            except _UNDECODABLE as e:
                log_skipped(sample, e)
                host.jpegs[row] = None
                host.ready.pop(row, None)
                skipped += 1
                continue
            host.labels[row] = label
            host.alphas[row] = lighting_alphas(rng, self.lighting_std)
            host.keys[row] = sample["__key__"]
        return skipped

    def _draw(self, host: HostBatch, row: int, data: bytes, rng: np.random.Generator) -> None:
        header = jpeg_header(data)
        if header is None or not header.device_decodable:
            host.ready[row] = train_image(data, self.image_size, rng, self.min_crop_area)
            return
        header.check()
        host.boxes[row] = random_resized_crop_box(header.width, header.height, rng, scale=(self.min_crop_area, 1.0))
        host.flips[row] = rng.random() < 0.5
        host.sizes[row], host.jpegs[row] = (header.height, header.width), data


def cpu_crop(data: bytes, box, size: int, flip: bool) -> np.ndarray:
    """The CPU path's pixels for a box already drawn: what train_image makes from the same draws."""
    image = decode_region(data, box, size, size)
    return np.ascontiguousarray(image[:, ::-1] if flip else image)


def augment_train(host: HostBatch, size: int, device: torch.device, max_elements: int = 1 << 25) -> Batch:
    """A HostBatch as the model's uint8 batch on ``device``: decoded, cropped, resized, flipped."""
    keys, skipped = list(host.keys), host.skipped
    rows = [i for i, data in enumerate(host.jpegs) if data is not None and keys[i] is not None]
    decoded = decode_jpegs([host.jpegs[i] for i in rows], device)
    ready = dict(host.ready)
    on_device = []
    for i, image in zip(rows, decoded):
        if image is not None and tuple(image.shape[1:]) == tuple(host.sizes[i]):
            on_device.append((i, image))
            continue
        try:  # refused, or pixels that disagree with the header: the CPU path knows what to do
            ready[i] = cpu_crop(host.jpegs[i], host.boxes[i], size, bool(host.flips[i]))
        except _UNDECODABLE:
            keys[i] = None
            skipped += 1
    images = torch.empty((len(keys), 3, size, size), dtype=torch.uint8, device=device)
    if on_device:
        index = np.array([i for i, _ in on_device])
        crops = to_uint8(crop_resize([image for _, image in on_device], host.boxes[index], np.arange(len(index)),
                                     size, max_elements))
        flips = _upload(host.flips[index], device)[:, None, None, None]
        images.index_copy_(0, _upload(index, device), torch.where(flips, crops.flip(3), crops))
    ready_rows = [i for i in sorted(ready) if keys[i] is not None]
    if ready_rows:
        pixels = _upload(np.stack([ready[i] for i in ready_rows]), device).permute(0, 3, 1, 2)
        images.index_copy_(0, _upload(np.array(ready_rows), device), pixels)
    valid = [i for i, key in enumerate(keys) if key is not None]
    if len(valid) < len(keys):  # rare: some samples were corrupt
        images = images.index_select(0, _upload(np.array(valid, np.int64), device))
    return Batch(host.step, images, _upload(host.labels[valid], device), _upload(host.alphas[valid], device),
                 [keys[i] for i in valid], skipped)


class DeviceStage:
    """Runs ``work`` over ``source`` on a background thread, ``depth`` items ahead.

    On CUDA the thread issues its work on its own stream; the consumer's stream waits for an
    item's event before using it, and the item's tensors are marked as used by the consumer's
    stream so the allocator does not hand their memory back to the worker too early.
    """

    def __init__(self, source: Iterator, work: Callable, device: torch.device, depth: int = 2):
        self.source, self.work, self.device = source, work, _indexed(device)
        self.items: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.closed = threading.Event()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _run(self) -> None:
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)
            for item in self.source:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        result = self.work(item)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    result, event = self.work(item), None
                if not self._put(("item", result, event)):
                    return
            self._put(("end", None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(("error", e, None))
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def _put(self, entry) -> bool:
        while not self.closed.is_set():
            try:
                self.items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        worker = threading.Thread(target=self._run, name="device-stage", daemon=True)
        worker.start()
        try:
            while True:
                kind, result, event = self.items.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise result
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in _tensors(result):
                        tensor.record_stream(current)
                yield result
        finally:
            self.closed.set()
            # The worker finishes the item in hand and closes its source; a thread left inside a
            # decoder at interpreter exit would abort the process.
            worker.join(timeout=60)


def _tensors(item) -> list[torch.Tensor]:
    values = item.values() if isinstance(item, dict) else vars(item).values()
    return [v for v in values if isinstance(v, torch.Tensor) and v.device.type == "cuda"]


def gpu_train_batches(split: SplitInfo, plan: EpochPlan, world_size: int, rank: int, start_step: int, seed: int,
                      image_size: int, shuffle_block: int, num_workers: int, lighting_std: float = 0.0,
                      min_crop_area: float = 0.08, prefetch: int = 2, device: torch.device | str = "cuda",
                      max_elements: int = 1 << 25) -> Iterator[Batch]:
    """``data.train_batches`` decoded on ``device``: the same batches, keys, labels and draws.

    The uint8 images, labels and lighting draws arrive on ``device``; lighting and normalisation
    are left to ``transforms.to_model_input``, as for ``train_batches``' batches.
    """
    device = _indexed(device)
    headers = HeaderLoader(split, plan, rank_slices(plan, world_size, rank), start_step, seed, image_size,
                           shuffle_block, num_workers, lighting_std, min_crop_area, prefetch)
    return iter(DeviceStage(iter(headers), lambda host: augment_train(host, image_size, device, max_elements),
                            device))


# ---- evaluation -----------------------------------------------------------------------------------

@dataclass
class HostEvalBatch:
    jpegs: list[bytes | None]
    boxes: list[list[tuple[float, ...]]]
    sizes: list[tuple[int, int]]  # height and width from the JPEG header
    labels: list[int]
    skipped: int
    ready: dict[int, np.ndarray] = field(default_factory=dict)  # row -> eval_image's pixels


def _rounded(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box the CPU path crops at full size (transforms._crop's rounding)."""
    x0, y0 = int(round(box[0])), int(round(box[1]))
    return x0, y0, max(x0 + 1, min(width, int(round(box[2])))), max(y0 + 1, min(height, int(round(box[3]))))


def eval_host_batches(split: SplitInfo, segments, image_size: int, resize: int, batch_size: int,
                      ten_crop: bool) -> Iterator[HostEvalBatch]:
    """The rank's evaluation samples in read order, with their crop boxes, ``batch_size`` at a time."""
    batch = HostEvalBatch([], [], [], [], 0)
    for sample in read_segments(split.urls, segments, split.digests):
        try:
            data, label = sample_parts(sample, split.num_classes)
            header = jpeg_header(data)
            if header is None or not header.device_decodable:
                batch.ready[len(batch.labels)] = eval_image(data, image_size, resize, ten_crop)
                data, boxes, hw = None, [], (0, 0)
            else:
                header.check()
                boxes = [_rounded(b, header.width, header.height)
                         for b in eval_boxes(header.width, header.height, image_size, resize, ten_crop)]
                hw = (header.height, header.width)
        except _UNDECODABLE as e:
            log_skipped(sample, e)
            batch.skipped += 1
        else:
            batch.jpegs.append(data)
            batch.boxes.append(boxes)
            batch.sizes.append(hw)
            batch.labels.append(label)
        if len(batch.labels) == batch_size:
            yield batch
            batch = HostEvalBatch([], [], [], [], 0)
    if batch.labels or batch.skipped:
        yield batch


def augment_eval(host: HostEvalBatch, size: int, resize: int, ten_crop: bool, device: torch.device,
                 max_elements: int = 1 << 25) -> dict:
    """``eval_batches``' dict for one HostEvalBatch, the uint8 images on ``device``."""
    crops_per_image = 5 if ten_crop else 1
    rows = [i for i, data in enumerate(host.jpegs) if data is not None]
    decoded = decode_jpegs([host.jpegs[i] for i in rows], device)
    ready, keep, skipped = dict(host.ready), [True] * len(host.labels), host.skipped
    on_device = []
    for i, image in zip(rows, decoded):
        if image is not None and tuple(image.shape[1:]) == host.sizes[i]:
            on_device.append((i, image))
            continue
        try:
            ready[i] = eval_image(host.jpegs[i], size, resize, ten_crop)
        except _UNDECODABLE:
            keep[i], skipped = False, skipped + 1
    shape = (len(keep), 10, 3, size, size) if ten_crop else (len(keep), 3, size, size)
    images = torch.empty(shape, dtype=torch.uint8, device=device)
    if on_device:
        index = np.array([i for i, _ in on_device])
        boxes = np.array([box for i in index for box in host.boxes[i]], np.float32)
        owners = np.repeat(np.arange(len(index)), crops_per_image)
        crops = to_uint8(crop_resize([image for _, image in on_device], boxes, owners, size, max_elements))
        if ten_crop:
            crops = crops.view(len(index), 5, 3, size, size)
            crops = torch.cat([crops, crops.flip(4)], dim=1)
        images.index_copy_(0, _upload(index, device), crops)
    ready_rows = sorted(ready)
    if ready_rows:
        pixels = _upload(np.stack([ready[i] for i in ready_rows]), device)
        pixels = pixels.permute(0, 1, 4, 2, 3) if ten_crop else pixels.permute(0, 3, 1, 2)
        images.index_copy_(0, _upload(np.array(ready_rows), device), pixels)
    valid = [i for i, k in enumerate(keep) if k]
    if len(valid) < len(keep):
        images = images.index_select(0, _upload(np.array(valid, np.int64), device))
    # Labels stay on the host, as eval_batches' do: the counts are made there.
    labels = torch.tensor([host.labels[i] for i in valid], dtype=torch.long)
    return {"images": images, "labels": labels, "skipped": skipped}


def gpu_eval_batches(split: SplitInfo, world_size: int, rank: int, image_size: int, resize: int, batch_size: int,
                     ten_crop: bool = False, device: torch.device | str = "cuda", max_elements: int = 1 << 25):
    """``data.eval_batches`` decoded on ``device``: every sample of the rank's share, counted once."""
    device = _indexed(device)
    source = eval_host_batches(split, eval_segments(split.sizes, world_size, rank), image_size, resize, batch_size,
                               ten_crop)
    return iter(DeviceStage(source, lambda host: augment_eval(host, image_size, resize, ten_crop, device,
                                                              max_elements), device))
