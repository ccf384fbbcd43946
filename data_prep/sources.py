"""Find the images of an ImageFolder / ImageNet-layout dataset and the class table.

Layouts understood:
- ``SRC/{split}/{class}/**/file`` for every split (ImageFolder, ImageNet's train and val after the
  usual val re-layout);
- a flat ``SRC/val/`` of files with Kaggle's ``LOC_val_solution.csv`` beside it (``SRC/``), whose
  first token of ``PredictionString`` is the image's class id.

The class index is the position of the class id in sorted order, as torchvision's ImageFolder
and every ImageNet checkpoint assume. Names come from ``LOC_synset_mapping.txt`` when present,
else from torchvision's ImageNet names when the ids are exactly 1000 WordNet ids, else they are
the ids themselves.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate, islice
from pathlib import Path

from .errors import ShardError

KAGGLE_VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
_WNID = re.compile(r"^n\d{8}$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # as os.fsdecode


@dataclass(frozen=True)
class Reject:
    relpath: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.relpath, "reason": self.reason}


class FileTable:
    """The files of one split in path order, packed into arrays: a million files cost tens of MB
    rather than the ~0.8 GB of one Python object (and its strings) per file.

    File ``i`` is ``dirs[dir_of[i]] + "/" + name(i)``, relative to SRC. Names are kept as the file
    system's bytes (``os.fsencode``), so undecodable names survive the round trip.
    """

    def __init__(self):
        self.dirs: list[str] = []  # relative to SRC, '/'-separated
        self.dir_of = array("I")
        self.names = bytearray()
        self.ends = array("Q")  # end of each name in ``names``
        self.class_index = array("I")
        self.sizes = array("Q")
        self.key_clashes: dict[int, str] = {}  # the keys that are not simply the file's stem
        self._dir_prefixes: list[bytes] = []  # each folder as bytes, with its "/"

    def __len__(self) -> int:
        return len(self.sizes)

    def add_dir(self, reldir: str) -> int:
        self.dirs.append(reldir)
        return len(self.dirs) - 1

    def add(self, dir_index: int, name: str, class_index: int, size: int) -> None:
        self.dir_of.append(dir_index)
        self.names += os.fsencode(name)
        self.ends.append(len(self.names))
        self.class_index.append(class_index)
        self.sizes.append(size)

    def extend(self, dir_index: int, names: list[str], class_numbers: list[int], sizes: list[int]) -> None:
        """``add`` for each of a directory's files at once."""
        if not names:
            return
        # One encode for the lot (as os.fsencode would encode each): names hold no NUL.
        encoded = "\0".join(names).encode(_FS_ENCODING, _FS_ERRORS).split(b"\0")
        self.ends.extend(islice(accumulate(map(len, encoded), initial=len(self.names)), 1, None))
        self.names += b"".join(encoded)
        self.dir_of.extend(array("I", [dir_index]) * len(names))
        self.class_index.extend(class_numbers)
        self.sizes.extend(sizes)

    def name(self, i: int) -> str:
        return self.names[self.ends[i - 1] if i else 0:self.ends[i]].decode(_FS_ENCODING, _FS_ERRORS)

    def relpath(self, i: int) -> str:
        return f"{self.dirs[self.dir_of[i]]}/{self.name(i)}"

    def names_in(self, start: int, end: int) -> list[str]:
        """``[self.name(i) for i in range(start, end)]``, decoded together when they are ASCII (a
        name at a time costs more than the rest of what most callers do with it)."""
        if end <= start:
            return []
        first = self.ends[start - 1] if start else 0
        ends = self.ends[start:end]
        chunk = self.names[first:ends[-1]]
        if not chunk.isascii():
            return [self.name(i) for i in range(start, end)]
        text = chunk.decode(_FS_ENCODING, _FS_ERRORS)
        bounds = [e - first for e in ends]
        return [text[a:b] for a, b in zip([0] + bounds, bounds)]

    def joined_relpaths(self, files) -> str:
        """``"\\0".join(self.relpath(i) for i in files)``, decoded once: names and folders are
        joined as the file system's bytes, at separators no multi-byte character spans."""
        if len(self._dir_prefixes) != len(self.dirs):
            self._dir_prefixes = [os.fsencode(d) + b"/" for d in self.dirs]
        dirs, names, ends, dir_of = self._dir_prefixes, self.names, self.ends, self.dir_of
        joined = b"\0".join([dirs[dir_of[i]] + names[ends[i - 1] if i else 0:ends[i]] for i in files])
        return joined.decode(_FS_ENCODING, _FS_ERRORS)

    def relpaths_in(self, start: int, end: int) -> list[str]:
        """``[self.relpath(i) for i in range(start, end)]``."""
        dirs = self.dirs
        return [f"{dirs[d]}/{name}" for d, name in zip(self.dir_of[start:end], self.names_in(start, end))]

    def key(self, i: int) -> str:
        return self.key_clashes.get(i) or stem_key(self.name(i))

    def in_path_order(self) -> "FileTable":
        """This table sorted by relative path (the order every plan starts from).

        Each directory's names are added sorted, so the table is in order unless a directory's
        first path sorts before the previous directory's last ("a/b/x" after "a/z"): only those
        boundaries are compared, and only such a tree pays for a full sort."""
        starts = [i for i in range(1, len(self)) if self.dir_of[i] != self.dir_of[i - 1]]
        if all(self.relpath(i - 1) < self.relpath(i) for i in starts):
            return self
        ordered = FileTable()
        ordered.dirs = self.dirs
        for i in sorted(range(len(self)), key=self.relpath):
            ordered.add(self.dir_of[i], self.name(i), self.class_index[i], self.sizes[i])
        return ordered

    def find_key_clashes(self) -> None:
        """Find the files whose key (see ``assign_keys``) is not simply their stem, without
        holding every stem.

        Only files whose stem is shared, or could equal a suffixed key (``x_1`` beside two ``x``),
        can get anything but their stem; a bitmap of stem hashes finds the candidates, an exact
        count confirms them, and ``assign_keys`` runs on those files alone."""
        n = len(self)
        bits = 1 << min(32, max(16, (16 * n).bit_length()))  # ~16 bits a file: few false candidates
        seen = bytearray(bits // 8)
        slot_of = array("I")
        candidates = set()
        for stem in self._stem_keys():
            slot = hash(stem) & (bits - 1)
            slot_of.append(slot)
            if seen[slot >> 3] & (1 << (slot & 7)):
                candidates.add(slot)
            seen[slot >> 3] |= 1 << (slot & 7)
        del seen
        counts: dict[str, int] = {}
        for i, slot in enumerate(slot_of):
            if slot in candidates:
                stem = stem_key(self.name(i))
                counts[stem] = counts.get(stem, 0) + 1
        del slot_of
        shared = {stem for stem, count in counts.items() if count > 1}
        if not shared:
            self.key_clashes = {}
            return
        involved = [i for i, stem in enumerate(self._stem_keys()) if _derives_from(stem, shared)]
        keys = assign_keys([self.relpath(i) for i in involved])
        self.key_clashes = {i: key for i, key in zip(involved, keys) if key != stem_key(self.name(i))}

    def _stem_keys(self, chunk: int = 4096) -> Iterator[str]:
        """``stem_key`` of every file's name, in order."""
        for start in range(0, len(self), chunk):
            yield from stem_keys(self.names_in(start, min(len(self), start + chunk)))


def _derives_from(stem: str, shared: set[str]) -> bool:
    """True when ``stem``, or what is left after stripping ``_<digits>`` suffixes, is in ``shared``."""
    while True:
        if stem in shared:
            return True
        base, sep, digits = stem.rpartition("_")
        if not sep or not digits.isdigit() or not digits.isascii():
            return False
        stem = base


def stem_key(name: str) -> str:
    # at most 80 characters, so "{key}.json" fits a plain ustar member name
    return _KEY_UNSAFE.sub("_", name.split(".")[0])[:80] or "sample"


def stem_keys(names: list[str]) -> list[str]:
    """``[stem_key(name) for name in names]``, with one search of them all for characters to replace."""
    stems = [name.split(".", 1)[0] for name in names]
    if _KEY_UNSAFE.search("".join(stems)):
        return [_KEY_UNSAFE.sub("_", stem)[:80] or "sample" for stem in stems]
    return [stem[:80] or "sample" for stem in stems]


@dataclass
class SourceDataset:
    root: Path
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, FileTable]
    rejects: dict[str, list[Reject]] = field(default_factory=dict)

    def class_table(self) -> list[dict]:
        return [{"index": i, "id": cid, "name": name}
                for i, (cid, name) in enumerate(zip(self.class_ids, self.class_names))]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(root: Path, reldir: str) -> Iterator[tuple[str, list[str]]]:
    """(directory relative to ``root``, its visible file names sorted) for ``reldir`` and every
    folder under it, in ``os.walk`` order; symlinked directories are not followed. ``os.walk``
    itself, written out: it builds, per entry, lists this discards."""
    under_root = len(os.path.join(root, ""))
    pending = [os.path.join(root, reldir)]
    while pending:
        top = pending.pop()
        try:
            with os.scandir(top) as listing:
                entries = list(listing)
        except OSError:
            continue  # as os.walk without onerror: an unreadable folder is left out
        try:
            folders = [e for e in entries if e.is_dir()]
        except OSError:  # an entry whose type cannot be known counts as a file, as in os.walk
            folders = [e for e in entries if _is_dir(e)]
        files = [e.name for e in entries if not e.name.startswith(".")]  # _visible, inlined
        if folders:
            files = sorted(set(files) - {e.name for e in folders})
        else:
            files.sort()
        yield top[under_root:], files
        subfolders = sorted((e for e in folders if _visible(e.name)), key=lambda e: e.name)
        # os.walk(followlinks=False) lists a symlinked folder but does not go into it
        pending.extend(os.path.join(top, e.name) for e in reversed(subfolders) if not _is_link(e))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if _visible(e.name) and e.is_dir())


def _read_kaggle_labels(csv_path: Path) -> dict[str, str]:
    """ImageId -> class id from Kaggle's LOC_val_solution.csv."""
    labels = {}
    try:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                tokens = (row.get("PredictionString") or "").split()
                if row.get("ImageId") and tokens:
                    labels[row["ImageId"]] = tokens[0]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ShardError(f"cannot read {csv_path}: {e}; fix or remove the file") from None
    if not labels:
        raise ShardError(f"{csv_path} holds no ImageId,PredictionString rows; fix or remove the file")
    return labels


def _read_synset_mapping(path: Path) -> dict[str, str]:
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


def _class_names(src: Path, class_ids: list[str]) -> list[str]:
    mapping = src / SYNSET_MAPPING
    if mapping.is_file():
        names = _read_synset_mapping(mapping)
        return [names.get(cid, cid) for cid in class_ids]
    if len(class_ids) == 1000 and all(_WNID.match(c) for c in class_ids):
        # Sorted WordNet ids are ImageNet-1k's class order, the order torchvision's names follow.
        from torchvision.models import AlexNet_Weights

        return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
    return list(class_ids)


def assign_keys(relpaths: list[str]) -> list[str]:
    """WebDataset-safe keys, unique within a split, for files given in path order.

    WebDataset splits a member name at the first dot, so keys hold no dots; clashes (the same
    stem in two class folders) get a numeric suffix in path order, which keeps keys stable.
    """
    seen: dict[str, int] = {}
    keys = []
    for relpath in relpaths:
        stem = stem_key(relpath.rpartition("/")[2])
        key = stem
        while key in seen:
            seen[stem] += 1
            key = f"{stem}_{seen[stem]}"
        seen.setdefault(key, 0)
        keys.append(key)
    return keys


def scan_source(src: str | Path, splits: list[str] | None = None, on_listed=None) -> SourceDataset:
    """List a dataset's images per split. Raises ShardError if SRC is missing or holds no images.

    ``on_listed(root, split, table)``, if given, is called each time a folder's files have been
    added to a split's table, with the files in the order listed so far (the returned table is
    that same object unless the tree had to be sorted)."""
    root = Path(src).expanduser()
    if not root.exists():
        raise ShardError(f"SRC {root} does not exist: pass the dataset root holding train/ and val/")
    if not root.is_dir():
        raise ShardError(f"SRC {root} is not a directory: pass the dataset root holding train/ and val/")
    root = root.resolve()
    wanted = splits or [s for s in ("train", "val") if (root / s).is_dir()]
    if not wanted:
        raise ShardError(f"SRC {root} has neither train/ nor val/: pass an ImageFolder root or name --splits")
    for split in wanted:
        if not (root / split).is_dir():
            raise ShardError(f"split {split!r} not found: {root / split} is not a directory; fix --splits")

    kaggle_csv = root / KAGGLE_VAL_CSV
    kaggle_labels = _read_kaggle_labels(kaggle_csv) if kaggle_csv.is_file() else {}

    # Files are recorded with a class number in order of discovery; the class index (the position
    # in the sorted union of every split's classes) is only known once all splits are scanned.
    found: dict[str, int] = {}
    tables: dict[str, FileTable] = {}
    rejects: dict[str, list[Reject]] = {}
    for split in wanted:
        table, rejects[split] = FileTable(), []
        for class_id in _class_dirs(root / split):
            number = found.setdefault(class_id, len(found))
            for reldir, names in _walk_files(root, f"{split}/{class_id}"):
                _add_files(table, root, reldir, names, number, rejects[split])
                if on_listed is not None:
                    on_listed(str(root), split, table)
        loose = sorted(e.name for e in os.scandir(root / split) if _visible(e.name) and not e.is_dir())
        if loose and kaggle_labels:
            def number_of(name: str) -> int | None:
                class_id = kaggle_labels.get(name.split(".")[0])
                return None if class_id is None else found.setdefault(class_id, len(found))

            _add_files(table, root, split, loose, number_of, rejects[split])
            if on_listed is not None:
                on_listed(str(root), split, table)
        tables[split] = table

    ordered_ids = sorted(found)
    position = {cid: i for i, cid in enumerate(ordered_ids)}
    index_of = [position[cid] for cid in found]  # class number (discovery order) -> class index
    dataset = SourceDataset(root, ordered_ids, _class_names(root, ordered_ids), {}, rejects)
    for split, table in tables.items():
        table.class_index = array("I", (index_of[number] for number in table.class_index))
        table = table.in_path_order()
        table.find_key_clashes()
        dataset.splits[split] = table

    if not any(len(t) for t in dataset.splits.values()):
        raise ShardError(f"SRC {root} holds no files in {', '.join(wanted)}: expected {wanted[0]}/<class>/<image>")
    return dataset


def _add_files(table: FileTable, root: Path, reldir: str, names: list[str], class_number, rejects: list[Reject]):
    """Add a directory's files (sorted names) to ``table``, or to ``rejects`` with the reason.
    ``class_number``: every file's, or a function of a file's name giving it (None: no label)."""
    d = table.add_dir(reldir)
    numbers = [class_number(name) for name in names] if callable(class_number) else None
    labelled = names if numbers is None else [name for name, number in zip(names, numbers) if number is not None]
    sizes = _sizes(os.path.join(root, reldir), labelled)
    if numbers is None and None not in sizes:  # a class folder whose files all exist: all at once
        table.extend(d, names, [class_number] * len(names), sizes)
        return
    kept, kept_numbers, kept_sizes = [], [], []
    listed = iter(sizes)
    for i, name in enumerate(names):  # one at a time, so the rejects stay in name order
        number = class_number if numbers is None else numbers[i]
        if number is None:
            rejects.append(Reject(f"{reldir}/{name}", f"no label in {KAGGLE_VAL_CSV}"))
            continue
        size = next(listed)
        if size is None:
            rejects.append(Reject(f"{reldir}/{name}", "unreadable: broken symlink or vanished file"))
            continue
        kept.append(name)
        kept_numbers.append(number)
        kept_sizes.append(size)
    table.extend(d, kept, kept_numbers, kept_sizes)


def _sizes(folder: str, names: list[str]) -> list[int | None]:
    """The sizes of ``folder``'s files ``names``, following symlinks; None for a broken one. Looked
    up from the open folder: the path to it is walked once, not once per file."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # gone or unreadable now: each file is looked up by its path, as it would be
        fd = None
    sizes = []
    try:
        for name in names:
            try:
                sizes.append(os.stat(name, dir_fd=fd).st_size if fd is not None
                             else os.stat(os.path.join(folder, name)).st_size)
            except OSError:
                sizes.append(None)
    finally:
        if fd is not None:
            os.close(fd)
    return sizes
