"""The hand-written tar reader and writer alone, in memory, against same-run baselines.

- reading: ``workers.data.loader.iter_tar`` vs ``tarfile`` (streaming, as the loader reads) vs
  webdataset's ``tar_file_iterator``;
- writing: ``data_prep.shards.TarShardWriter`` vs ``tarfile`` (ustar, what ours writes) vs
  webdataset's ``TarWriter``.

Two archives: members of ~30 KB (a 256 px JPEG's size) alone, and the shard layout alexray writes
(each sample a ~30 KB ``.jpg``, a ``.cls`` and a ``.json``), where the per-header cost weighs more.
No disk and no decoding: only tar framing is measured. Each ratio is baseline time / our time.
"""

from __future__ import annotations

import io
import random
import tarfile

import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from bench.common import record, timed
from data_prep.shards import TarShardWriter
from workers.data.loader import iter_tar

SAMPLES = 3000


def _members(layout: str, samples: int = SAMPLES) -> list[tuple[str, bytes]]:
    """(name, data) in file order; JPEG-sized members of 20-40 KB (random bytes: tar does not look)."""
    rng = random.Random(0)
    pool = rng.randbytes(64 * 1024)
    members = []
    for i in range(samples):
        size = rng.randint(20_000, 40_000)
        start = rng.randint(0, len(pool) - size)
        key = f"{i:08d}"
        members.append((f"{key}.jpg", pool[start:start + size]))
        if layout == "shard":
            members.append((f"{key}.cls", str(i % 1000).encode()))
            members.append((f"{key}.json", b'{"class_id": "n01440764", "class_index": %d, "height": 256, '
                                           b'"source": "train/n01440764/n01440764_%d.JPEG", "width": 341}' % (i, i)))
    return members


def _write_ours(members) -> bytes:
    out = io.BytesIO()
    writer = TarShardWriter(out)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    return out.getvalue()


def _write_tarfile(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _write_webdataset(members) -> bytes:
    """One ``write`` per sample, as webdataset is used: members sharing a key go in together."""
    samples: dict[str, dict] = {}
    for name, data in members:
        key, _, ext = name.partition(".")
        samples.setdefault(key, {"__key__": key})[ext] = data
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False, mtime=0) as writer:
        for sample in samples.values():
            writer.write(sample)
    return out.getvalue()


def _read_ours(blob: bytes) -> int:
    return sum(len(data) for _, data in iter_tar(io.BytesIO(blob)))


def _read_tarfile(blob: bytes) -> int:
    total = 0
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        for info in tar:
            if info.isreg():
                total += len(tar.extractfile(info).read())
    return total


def _read_webdataset(blob: bytes) -> int:
    return sum(len(item["data"]) for item in tar_file_iterator(io.BytesIO(blob)))


def _compare(results, what: str, n: int, ours, *baselines) -> None:
    """Time ``ours`` once and each (label, baseline) against it: a row "WHAT: ours vs LABEL"."""
    ours_s = timed(ours, repeat=5)
    for label, baseline in baselines:
        with record(results, f"{what}: ours vs {label}", "> 1") as r:
            base_s = timed(baseline, repeat=5)
            r.update({f"{label.split()[0]}_members_s": round(n / base_s), "ours_members_s": round(n / ours_s),
                      "ratio": round(base_s / ours_s, 2)})


def run(results: list) -> None:
    for layout, what in (("jpg", f"{SAMPLES} members of 20-40 KB"),
                         ("shard", f"{SAMPLES} samples of .jpg (20-40 KB) + .cls + .json")):
        members = _members(layout)
        payload = sum(len(data) for _, data in members)
        blob = _write_ours(members)
        n = len(members)
        print(f"tar benchmarks ({layout}): {what}, {n} members, {payload / 1e6:.0f} MB, in memory")
        assert _read_ours(blob) == _read_tarfile(blob) == _read_webdataset(blob) == payload
        assert [m for m in iter_tar(io.BytesIO(_write_tarfile(members)))] == members

        _compare(results, f"tar read ({layout})", n, lambda: _read_ours(blob),
                 ("tarfile", lambda: _read_tarfile(blob)),
                 ("webdataset tar_file_iterator", lambda: _read_webdataset(blob)))
        _compare(results, f"tar write ({layout})", n, lambda: _write_ours(members),
                 ("tarfile", lambda: _write_tarfile(members)),
                 ("webdataset TarWriter", lambda: _write_webdataset(members)))
