"""Decide what to do with each input file, and turn it into the RGB JPEG a shard stores.

Two steps, so a dataset can be planned before any shard is written:

- ``probe_image`` (cheap, run over every file first) reads the header and decides: *keep* the
  original bytes (a complete RGB JPEG needing no rotation or resize), *convert* (CMYK, grayscale,
  PNG, EXIF-rotated, other formats: decoded once here so broken files are caught now), *resize*
  (``--resize-short-side``), or *reject* with a reason. The format always comes from the bytes,
  never from the file name.
- ``prepare_image`` (in the shard writer) produces the stored bytes for that decision.

``sample_jpeg`` does both for one file in memory, at its own size: what classifying a new image
needs to see it as training saw its samples.

A clean RGB JPEG is accepted on its structure (headers parse, the end-of-image marker is present)
unless ``check="decode"`` asks for a full decode: a full decode is what limits throughput, and
libjpeg tolerates most damage inside the entropy-coded data anyway.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ShardError
from .jpeg_header import plain_jpeg_size

KEEP, CONVERT, RESIZE, REJECT = "keep", "convert", "resize", "reject"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning level
# JPEG headers end well within this (one APP segment holds at most 64 KB; larger ones fall back to
# reading the whole file). Not more: a read buffer above malloc's 128 KB mmap threshold is mapped
# and unmapped on every call, which cost more than the rest of the probe.
_HEAD_BYTES = 64 * 1024
_EOI = b"\xff\xd9"
# ``plain_jpeg_size`` reads headers as this Pillow's JPEG plugin does; under another major version
# Pillow reads every file itself.
_PLAIN_JPEG_READER = PIL.__version__.split(".")[0] == "13"
_ORIENTATION = 0x0112


class RejectedImage(Exception):
    """The file cannot become a training sample; the message is the reason kept in the manifest."""


@dataclass(frozen=True)
class ImageOptions:
    resize_short_side: int | None = None  # shrink so the short side is this many pixels; None keeps size
    quality: int = 90  # JPEG quality whenever an image is re-encoded
    check: str = "header"  # "header": structural check of clean JPEGs; "decode": decode every image
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs

    def __post_init__(self):
        if self.check not in ("header", "decode"):
            raise ShardError(f"check must be 'header' or 'decode', not {self.check!r}")
        if not 1 <= self.quality <= 100:
            raise ShardError(f"quality must be in 1..100, not {self.quality}")
        if self.resize_short_side is not None and self.resize_short_side < 8:
            raise ShardError(f"resize_short_side must be at least 8, not {self.resize_short_side}")
        if self.max_pixels < 1:
            raise ShardError(f"max_pixels must be positive, not {self.max_pixels}")


@dataclass(frozen=True)
class Probe:
    action: str  # KEEP, CONVERT, RESIZE or REJECT
    reason: str = ""  # why it was rejected
    width: int = 0  # as displayed (after EXIF rotation), before any resize
    height: int = 0


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open from bytes with the bomb guard applied from the header, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise RejectedImage(f"decompression bomb refused: {e}") from None
        except UnidentifiedImageError:
            raise RejectedImage("not an image: unrecognised format") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise RejectedImage(f"unreadable image header: {e}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise RejectedImage(
            f"decompression bomb refused: {image.width}x{image.height} = {pixels} pixels > max_pixels {max_pixels}"
        )
    if image.width < 1 or image.height < 1:
        raise RejectedImage(f"empty image: {image.width}x{image.height}")
    return image


def decode_image(image: Image.Image) -> None:
    """Decode every pixel; Pillow raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays off)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombWarning as e:
        raise RejectedImage(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        message = str(e)
        if "truncated" in message:
            raise RejectedImage(f"truncated image: {message}") from None
        raise RejectedImage(f"corrupt image, cannot decode: {message}") from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: treat as unrotated; Pillow may choke on it
        return 1


def _kept_as_is(image: Image.Image, orientation: int, tail: bytes) -> bool:
    """The rule for *keep*: a complete (end-of-image marker in ``tail``, the file's last bytes),
    upright RGB JPEG is stored byte for byte."""
    return (image.format == "JPEG" and image.mode == "RGB" and orientation == 1
            and tail.rstrip(b"\x00").endswith(_EOI))


def _displayed_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    if orientation in (5, 6, 7, 8):  # the EXIF orientations that swap width and height
        return image.height, image.width
    return image.width, image.height


def _read_for_probe(path: str, listed_size: int | None = None) -> tuple[bytes, bytes, int]:
    """The file's head (enough for headers) and its last bytes, without reading it all, and its
    size; ``listed_size`` is the size it was listed with, if known."""
    # Plain system calls: a Python file object costs more (fstat, ioctl, lseek, buffers) than the
    # reads themselves. A directory opens, and its read raises IsADirectoryError.
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, _HEAD_BYTES)
        if len(head) == listed_size and len(head) < _HEAD_BYTES:
            # A regular file reads short only at its end: the whole file, of the size listed.
            return head, head[-16:], len(head)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size <= len(head):
            return head, head[-16:], size
        return head, os.pread(fd, 16, max(0, size - 16)), size
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    """The whole file, read to its end; unbuffered, as a buffer would only add a copy."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def probe_image(path: str, options: ImageOptions) -> Probe:
    """Decide what to do with the file at ``path``; never raises for a bad image, only rejects it."""
    return Probe(*probe_file(path, options))


class _PlainJpeg:
    """What ``_kept_as_is`` reads of an image, for a header ``plain_jpeg_size`` accepted."""

    format, mode = "JPEG", "RGB"


def probe_file(path: str, options: ImageOptions, listed_size: int | None = None) -> tuple[str, str, int, int]:
    """``probe_image``'s (action, reason, width, height), without the Probe: what a batch of
    probes packs. ``listed_size``: the file's size when it was listed, if known."""
    try:
        head, tail, size = _read_for_probe(path, listed_size)
    except IsADirectoryError:
        return REJECT, "not a file", 0, 0
    except OSError as e:
        return REJECT, f"unreadable: {e.strerror or e}", 0, 0
    if size == 0:
        return REJECT, "empty file (0 bytes)", 0, 0
    if options.check == "header" and _PLAIN_JPEG_READER:
        # Most files are plain JPEGs: their size is read from the header bytes at hand, which
        # costs a fraction of Pillow's open; any other header goes to Pillow below.
        found = plain_jpeg_size(head)
        if found is not None:
            width, height = found
            pixels, limit = width * height, Image.MAX_IMAGE_PIXELS
            # What open_image accepts (a size beyond Pillow's own bomb limit goes to Pillow, for its
            # message), and the rule for keeping the bytes.
            if (width >= 1 and height >= 1 and pixels <= options.max_pixels and (limit is None or pixels <= limit)
                    and _kept_as_is(_PlainJpeg, 1, tail)):
                short = options.resize_short_side
                return RESIZE if short is not None and min(width, height) > short else KEEP, "", width, height
    return _probe_with_pillow(path, head, tail, size, options)


def _probe_with_pillow(path: str, head: bytes, tail: bytes, size: int,
                       options: ImageOptions) -> tuple[str, str, int, int]:
    data = head
    try:
        try:
            image = open_image(head, options.max_pixels)
        except RejectedImage:
            if size <= len(head):
                raise
            data = read_file(path)  # headers larger than the head we read (huge EXIF/ICC blocks)
            image = open_image(data, options.max_pixels)
        orientation = _orientation(image)
        width, height = _displayed_size(image, orientation)
        clean_jpeg = _kept_as_is(image, orientation, tail)
        if not clean_jpeg or options.check == "decode":
            if len(data) < size:
                data = read_file(path)
                if not clean_jpeg:
                    # Other formats may keep what counts past the head (a PNG's EXIF after its pixels).
                    whole = open_image(data, options.max_pixels)
                    orientation = _orientation(whole)
                    width, height = _displayed_size(whole, orientation)
            image = open_image(data, options.max_pixels)
            decode_image(image)
    except RejectedImage as e:
        return REJECT, str(e), 0, 0
    except OSError as e:
        return REJECT, f"unreadable: {e.strerror or e}", 0, 0
    short = options.resize_short_side
    if short is not None and min(width, height) > short:
        return RESIZE, "", width, height
    return KEEP if clean_jpeg else CONVERT, "", width, height


def sample_jpeg(data: bytes) -> bytes:
    """An image file's bytes as the RGB JPEG sharding (without ``--resize-short-side``) stores for it.

    The format comes from the bytes: a complete upright RGB JPEG is kept as it is; CMYK and
    grayscale JPEGs, PNGs (transparency on white), EXIF-rotated images and other formats become
    upright RGB JPEGs, as ``probe_image`` and ``prepare_image`` turn them into training samples.
    Truncated and non-image files raise ``RejectedImage`` with the reason.
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    options = ImageOptions()
    image = open_image(data, options.max_pixels)
    orientation = _orientation(image)
    if _kept_as_is(image, orientation, data[-16:]):
        return data
    width, height = _displayed_size(image, orientation)
    return prepare_image(data, Probe(CONVERT, width=width, height=height), options)[0]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels have arbitrary colours underneath: show them on white, as viewers do.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # CMYK (Adobe inversion handled by Pillow), L, P, I;16, ...


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """The (width, height) after shrinking the short side to ``short_side``; never enlarges."""
    if short_side is None or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, probe: Probe, options: ImageOptions) -> tuple[bytes, int, int]:
    """The RGB JPEG bytes to store for a probed file, with their width and height.

    Raises RejectedImage if the bytes turn out not to decode (possible only for files accepted
    on their structure alone) so the shard writer can record the reject and go on.
    """
    if probe.action == KEEP:
        return data, probe.width, probe.height
    assert probe.action in (CONVERT, RESIZE), probe.action
    image = open_image(data, options.max_pixels)
    target = resized_size(probe.width, probe.height, options.resize_short_side)
    if image.format == "JPEG" and target != (probe.width, probe.height):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target allows it: far less work.
        # draft() works in stored orientation and keeps the result at least as large as asked.
        stored = target if (image.width, image.height) == (probe.width, probe.height) else target[::-1]
        image.draft("RGB", stored)
    orientation = _orientation(image)
    decode_image(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)  # copies the image: only when there is something to undo
    image = _to_rgb(image)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue(), target[0], target[1]
