"""The hand-written tar reader (``workers.data.loader.iter_tar``) and writer (``data_prep.shards``) against
Python's tarfile, GNU tar and webdataset.

The reader must yield exactly the regular files, names and bytes tarfile reads, whoever wrote the
archive and whichever long-name extension they used (ustar prefix, GNU ``././@LongLink``, pax
``path``). The writer's archives must read back identically in tarfile and in GNU tar.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep.shards import TarShardWriter, _tar_header
from workers.data.loader import _group_samples, _octal, iter_tar

# Sizes around the 512-byte block: empty, padded, exact, one over, and a small JPEG's.
SIZES = (0, 1, 511, 512, 513, 1023, 30_000)

# Names every format holds: short, exactly 100 bytes, over 100 with a slash that ustar splits at
# (prefix <= 155, name <= 100), exactly 256 bytes split at the last possible slash, non-ASCII.
USTAR_NAMES = (
    "a.jpg",
    "x" * 96 + ".jpg",
    "p" * 150 + "/" + "n" * 95 + ".cls",
    "q" * 155 + "/" + "m" * 95 + ".json",
    "dir/" * 30 + "deep.jpg",
    "café/naïve-ünïcödé.jpg",
    "日本語/画像-0001.jpg",
    "emoji-😀.cls",
    "é" * 60 + "/" + "ü" * 45 + ".jpg",  # 120 + 1 + 94 bytes: split at the slash, between whole characters
)
# Names only the GNU and pax extensions hold: over 256 bytes, or a last component over 100 bytes.
LONG_NAMES = (
    "/".join(["c" * 60] * 5) + "/x.jpg",
    "l" * 140 + ".jpg",
    "ü" * 120 + "/" + "ö" * 70 + ".json",  # 240 + 1 + 145 bytes (a file system component holds 255)
)
UTF8_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


def gnu_tar() -> str:
    """The ``tar`` command, which must be GNU tar (Debian's package ``tar``)."""
    found = shutil.which("tar")
    assert found, "tar is missing: install Debian's package 'tar'"
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    assert "GNU tar" in version, f"{found} is not GNU tar: {version[:80]!r}"
    return found


def _members(names) -> list[tuple[str, bytes]]:
    """(name, data) pairs: every name, each size in turn, the bytes distinct per member."""
    return [(name, os.urandom(SIZES[i % len(SIZES)])) for i, name in enumerate(names)]


def tarfile_view(blob: bytes) -> list[tuple[str, bytes]]:
    """The regular files of an archive as tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(blob), encoding="utf-8") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def ours(blob: bytes) -> list[tuple[str, bytes]]:
    return list(iter_tar(io.BytesIO(blob)))


def _extension_used(blob: bytes, kind: str) -> bool:
    """Whether the archive really uses the long-name mechanism under test (else a test proves little)."""
    if kind == "gnu":
        return b"././@LongLink" in blob
    if kind == "pax":
        return b" path=" in blob
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:  # ustar: some header has a prefix
        return any(blob[m.offset + 345:m.offset + 500].strip(b"\0") for m in tar)


def _tarfile_archive(fmt: int, members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _not_files() -> list[tarfile.TarInfo]:
    """A directory, a symlink and a hard link, with names (and a link target) too long for ustar."""
    stem = "s" * 120 + "/"
    infos = []
    for name, kind, target in ((f"{stem}folder", tarfile.DIRTYPE, ""),
                               (f"{stem}link.jpg", tarfile.SYMTYPE, "t" * 150 + ".jpg"),
                               (f"{stem}hard.jpg", tarfile.LNKTYPE, "a.jpg")):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        infos.append(info)
    return infos


# --- the reader: archives written by tarfile --------------------------------------------------------

@pytest.mark.parametrize("fmt, names, extension", [
    (tarfile.USTAR_FORMAT, USTAR_NAMES, "ustar"),
    (tarfile.GNU_FORMAT, USTAR_NAMES + LONG_NAMES, "gnu"),
    (tarfile.PAX_FORMAT, USTAR_NAMES + LONG_NAMES, "pax"),
], ids=["ustar", "gnu", "pax"])
def test_reader_matches_tarfile_on_tarfiles_archives(fmt, names, extension):
    members = _members(names)
    blob = _tarfile_archive(fmt, members)
    assert _extension_used(blob, extension)
    assert tarfile_view(blob) == members  # the archive holds what was written
    assert ours(blob) == members


@pytest.mark.parametrize("fmt, extension", [(tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")],
                         ids=["gnu", "pax"])
def test_reader_skips_directories_links_and_global_headers_with_long_names(fmt, extension):
    """The long name (or link target) of a member that is not a file must not rename the next file."""
    members = _members(["a.jpg", "b" * 130 + ".jpg"])
    folder, symlink, hardlink = _not_files()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8",
                      pax_headers={"comment": "a global header"} if fmt == tarfile.PAX_FORMAT else None) as tar:
        tar.addfile(folder)
        for (name, data), link in zip(members, (symlink, hardlink)):
            tar.addfile(link)  # a long-named link right before each file
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = out.getvalue()
    assert _extension_used(blob, extension)
    assert tarfile_view(blob) == members
    assert ours(blob) == members


# --- the reader: archives written by GNU tar --------------------------------------------------------

def _tree(root: Path, names) -> list[tuple[str, bytes]]:
    members = _members(names)
    for name, data in members:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return members


@pytest.mark.parametrize("fmt", [None, "gnu", "oldgnu", "posix", "ustar"])
def test_reader_matches_tarfile_on_gnu_tars_archives(fmt, tmp_path):
    root = tmp_path / "files"
    members = _tree(root, USTAR_NAMES if fmt == "ustar" else USTAR_NAMES + LONG_NAMES)
    files = [name for name, _ in members]
    # Directory entries too (skipped by both readers), except in ustar: GNU tar cannot split a
    # directory name over 100 bytes whose only slash is the trailing one.
    folders = [] if fmt == "ustar" else sorted({posixpath.dirname(name) for name in files} - {""})
    archive = tmp_path / "out.tar"
    done = subprocess.run([gnu_tar(), *([f"--format={fmt}"] if fmt else []), "--no-recursion", "-cf", str(archive),
                           "-C", str(root), *folders, *files], env=UTF8_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    blob = archive.read_bytes()
    assert _extension_used(blob, {None: "gnu", "oldgnu": "gnu", "posix": "pax"}.get(fmt, fmt))
    assert tarfile_view(blob) == members
    assert ours(blob) == members


def test_reader_ignores_the_times_gnu_incremental_archives_keep_where_ustar_has_its_prefix(tmp_path):
    """GNU headers keep atime and ctime at ustar's prefix offset; only a POSIX magic means a prefix.
    (tarfile takes them for a prefix, so GNU tar's own listing is the reference here.)"""
    root = tmp_path / "files"
    members = _tree(root, ["d/a.jpg", "d/e/b.cls", "d/" + "n" * 120 + ".json"])
    archive = tmp_path / "incremental.tar"
    subprocess.run([gnu_tar(), "--format=gnu", "--incremental", "-cf", str(archive), "-C", str(root), "d"], check=True,
                   env=UTF8_ENV, capture_output=True)
    blob = archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert all(blob[m.offset_data - 512 + 345:m.offset_data - 512 + 357].strip(b"\0")  # the times are there
                   for m in tar if m.isreg())
    listed = subprocess.run([gnu_tar(), "--quoting-style=literal", "-tf", str(archive)], check=True, env=UTF8_ENV,
                            capture_output=True).stdout.decode("utf-8").splitlines()
    got = ours(blob)
    assert [name for name, _ in got] == [name for name in listed if not name.endswith("/")]
    assert sorted(got) == sorted(members)


# --- the reader: archives written by webdataset ----------------------------------------------------

def _samples(keys) -> list[dict]:
    return [{"__key__": key, "jpg": os.urandom(SIZES[i % len(SIZES)]), "cls": str(i % 10).encode(),
             "json": b"{}" if i % 2 else b""} for i, key in enumerate(keys)]


WDS_KEYS = ("000001", "k" * 150 + "/" + "0" * 90, "café-ü", "日本語-0003")


@pytest.mark.parametrize("fmt, keys", [
    (None, WDS_KEYS),  # TarWriter's default: ustar
    ("GNU_FORMAT", WDS_KEYS + ("g" * 300,)),
    ("PAX_FORMAT", WDS_KEYS + ("x" * 140 + "/" + "y" * 140,)),
], ids=["ustar", "gnu", "pax"])
def test_reader_matches_tarfile_on_webdataset_tarwriter(fmt, keys):
    out = io.BytesIO()
    samples = _samples(keys)
    with wds.TarWriter(out, encoder=False, mtime=0, format=fmt) as writer:
        for sample in samples:
            writer.write(sample)
    blob = out.getvalue()
    view = tarfile_view(blob)
    assert len(view) == 3 * len(samples)
    assert ours(blob) == view
    grouped = [{k: v for k, v in s.items() if k != "__url__"} for s in _group_samples(io.BytesIO(blob), "u")]
    assert grouped == samples


def test_reader_and_grouping_match_webdataset_on_shardwriters_shards(tmp_path):
    samples = _samples([f"sample-{i:04d}" for i in range(10)] + ["z" * 130 + "/last"])
    pattern = str(tmp_path / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, encoder=False, mtime=0, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    shards = sorted(tmp_path.glob("shard-*.tar"))
    assert len(shards) == 3
    ours_samples, stock = [], []
    for shard in shards:
        blob = shard.read_bytes()
        assert ours(blob) == tarfile_view(blob)
        ours_samples += [{k: v for k, v in s.items() if k != "__url__"} for s in _group_samples(io.BytesIO(blob), "u")]
        stock += [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
                  for s in group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(blob)}]))]
    assert [s["__key__"] for s in stock] == [s["__key__"] for s in samples]
    assert ours_samples == stock


def test_samples_of_different_folders_with_the_same_file_name_stay_apart():
    samples = [{"__key__": "class_a/0001", "jpg": b"A", "cls": b"3"},
               {"__key__": "class_b/0001", "jpg": b"B", "cls": b"7"}]
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    grouped = [{k: v for k, v in s.items() if k != "__url__"} for s in _group_samples(io.BytesIO(out.getvalue()), "u")]
    assert grouped == samples


@pytest.mark.parametrize("name", ["a\u2028b.jpg", "a" * 120 + "\nb.jpg", "d\x1c/e\x85f.jpg"])
def test_pax_names_holding_line_breaks_are_read_whole(name):
    blob = _tarfile_archive(tarfile.PAX_FORMAT, [(name, b"payload")])
    assert _extension_used(blob, "pax")
    assert ours(blob) == tarfile_view(blob) == [(name, b"payload")]


# --- the writer -------------------------------------------------------------------------------------

def _ours_archive(members) -> bytes:
    out = io.BytesIO()
    writer = TarShardWriter(out)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    return out.getvalue()


def _gnu_listing(archive: Path) -> list[tuple[str, int]]:
    """(name, size) of each member as ``tar -tvf`` prints them."""
    done = subprocess.run([gnu_tar(), "--quoting-style=literal", "--numeric-owner", "-tvf", str(archive)], check=True,
                          env=UTF8_ENV, capture_output=True)
    rows = []
    for line in done.stdout.decode("utf-8").splitlines():
        mode, owner, size, _date, _time, name = line.split(None, 5)
        assert mode == "-r--r--r--" and owner == "0/0", line
        rows.append((name, int(size)))
    return rows


def test_writers_archives_read_back_identically_in_tarfile_and_gnu_tar(tmp_path):
    members = _members(USTAR_NAMES)
    blob = _ours_archive(members)
    assert _extension_used(blob, "ustar")  # the prefix split was taken
    assert len(blob) % 10240 == 0 and blob.endswith(b"\0" * 1024)

    assert tarfile_view(blob) == members
    with tarfile.open(fileobj=io.BytesIO(blob), encoding="utf-8") as tar:
        infos = tar.getmembers()
    assert all(i.type == tarfile.REGTYPE and i.mode == 0o444 and i.mtime == 0 and i.uid == i.gid == 0 for i in infos)
    assert ours(blob) == members

    archive = tmp_path / "ours.tar"
    archive.write_bytes(blob)
    assert _gnu_listing(archive) == [(name, len(data)) for name, data in members]
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run([gnu_tar(), "-xf", str(archive), "-C", str(out)], check=True, env=UTF8_ENV, capture_output=True)
    extracted = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert extracted == dict(members)


# Around ustar's limits: a prefix of 155 bytes and a name of 100, split only at a slash.
SPLIT_CASES = (
    "n" * 100,
    "n" * 101,
    "p" * 155 + "/" + "n" * 100,
    "p" * 156 + "/" + "n" * 99,
    "p" * 154 + "/" + "n" * 101,
    "a/" + "n" * 101,
    "a" * 10 + "/" + "b" * 150 + "/" + "c" * 50,
    "a" * 100 + "/" + "b" * 60 + "/" + "c" * 90,
    "é" * 77 + "/" + "ü" * 50,
    "é" * 78 + "/" + "ü" * 50,
    "é" * 40 + "/" + "ü" * 51,
    "x/" * 127 + "x",
)


@pytest.mark.parametrize("name", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
def test_writer_takes_the_names_ustar_can_hold_and_refuses_the_rest_as_tarfile_does(name):
    try:
        expected = _tarfile_archive(tarfile.USTAR_FORMAT, [(name, b"data")])
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match="too long for ustar"):
            _tar_header(name, 4)
    else:
        blob = _ours_archive([(name, b"data")])
        assert tarfile_view(blob) == tarfile_view(expected) == [(name, b"data")]
        assert ours(blob) == [(name, b"data")]


@pytest.mark.parametrize("field", [
    b"0000644\0", b"000644 \0", b"   644 \0", b"\0" * 8, b"644\0\0\0\0\0", b"00000075300\0", b"00000075300 ",
    b"77777777777\0", b"        \0",
])
def test_octal_fields_read_as_tarfile_reads_them(field):
    assert _octal(field) == tarfile.nti(field)
