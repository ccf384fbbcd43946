"""The size of a plain JPEG read straight from its header bytes, as Pillow would read it.

Opening a small file with Pillow costs several times more than reading it: its JPEG plugin walks
the header a marker at a time through a file object and builds the quantisation tables. Most files
of a photo dataset hold nothing in their header but JFIF, comments, tables and one 8-bit
3-component frame, and for those the answer is a few bytes at known places.

``plain_jpeg_size`` answers only for a header made of segments whose every effect on Pillow's
``JpegImagePlugin`` (13.x) is known: APP0, COM, DQT, DHT, DRI, one SOF0/1/2 frame, then SOS, each
complete and well-formed, back to back. Anything else (EXIF, ICC, XMP, Adobe, MPF and every other
segment, fill bytes or junk between markers, a short or malformed segment, a second frame, a frame
Pillow does not read as "RGB") gives None, and the caller asks Pillow, whose verdict and error
message stay the ones that count.
"""

from __future__ import annotations

import struct

_SOI = b"\xff\xd8\xff"
_SOF = frozenset((0xC0, 0xC1, 0xC2))  # baseline, extended sequential, progressive: all "JPEG" to Pillow
_KEPT = frozenset((0xC4, 0xDD, 0xFE))  # DHT, DRI, COM: Pillow skips or stores them, whatever they hold
_DQT, _APP0, _SOS = 0xDB, 0xE0, 0xDA
_SEGMENT = struct.Struct(">BBH").unpack_from  # 0xFF, marker, length
_FRAME = struct.Struct(">BHHB").unpack_from  # sample bits, height, width, components
# Header rests read before (see plain_jpeg_size), by their first bytes: [(the whole rest, its size)]
_SEEN: dict[bytes, list[tuple[bytes, tuple[int, int]]]] = {}
_SEEN_MAX, _SEEN_PER_START = 256, 16


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the frame when ``data`` opens in Pillow as an "RGB" JPEG of that size
    whose header holds nothing that changes what Pillow reports of it (format, mode, size, EXIF
    orientation); None when that is not certain from these bytes alone."""
    if not data.startswith(_SOI):
        return None
    end, pos = len(data), 2
    # Leading comments and JFIF segments (often all that differs between files of one encoder).
    while pos + 4 <= end:
        fill, marker, length = _SEGMENT(data, pos)
        if fill != 0xFF or (marker != 0xFE and marker != _APP0) or length < 2 or pos + 2 + length > end:
            break
        if marker == _APP0 and length < 2 + 7 and data.startswith(b"JFIF", pos + 4, pos + 2 + length):
            return None  # too short for the JFIF version Pillow reads
        pos += 2 + length
    # The rest, up to the end of the start-of-scan segment: the same bytes, from the same state,
    # always read the same way, so a rest seen before whole gives the same answer.
    first = data[pos:pos + 64]
    seen = _SEEN.get(first)
    if seen is not None:
        for rest, size in seen:
            if data.startswith(rest, pos):
                return size
    found = _walk(data, pos, end)
    if found is None:
        return None
    size, rest_end = found
    if seen is None and len(_SEEN) < _SEEN_MAX:
        _SEEN[first] = seen = []
    if seen is not None and len(seen) < _SEEN_PER_START:
        seen.append((data[pos:rest_end], size))
    return size


def _walk(data: bytes, pos: int, end: int) -> tuple[tuple[int, int], int] | None:
    """The frame's (width, height) and where the start-of-scan segment ends, for the segments
    from ``pos`` on, or None (see ``plain_jpeg_size``)."""
    size = None
    while pos + 4 <= end:
        fill, marker, length = _SEGMENT(data, pos)  # the length counts itself, not the marker
        body, pos = pos + 4, pos + 2 + length
        if fill != 0xFF or length < 2 or pos > end:
            return None  # not a marker here, a length Pillow reads differently, or a truncated file
        if marker in _KEPT:
            continue
        if marker == _DQT:
            if not _tables_complete(data, body, pos):
                return None  # Pillow: "bad quantization table marker"
        elif marker == _SOS:
            return None if size is None else (size, pos)
        elif marker == _APP0:
            if length < 2 + 7 and data.startswith(b"JFIF", body, pos):
                return None  # too short for the JFIF version Pillow reads
        elif marker in _SOF and size is None:
            # Pillow needs 8-bit samples and reads 3 layers as "RGB", then reads the component
            # entries 3 bytes at a time, failing on a partial one.
            if length < 8 or (length - 8) % 3:
                return None
            bits, height, width, layers = _FRAME(data, body)
            if bits != 8 or layers != 3:
                return None
            size = (width, height)
        else:
            return None
    return None


def _tables_complete(data: bytes, pos: int, end: int) -> bool:
    """Whether the DQT segment body ``data[pos:end]`` is whole tables, as Pillow requires."""
    while pos < end:
        pos += 65 if data[pos] < 16 else 129  # 64 entries of 1 byte (precision 0) or of 2
        if pos > end:
            return False
    return True
