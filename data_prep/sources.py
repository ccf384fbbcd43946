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
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ShardError

KAGGLE_VAL_CSV = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
_WNID = re.compile(r"^n\d{8}$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SourceFile:
    """One input file of a split: where it is, its class, and the sample key it will get."""

    relpath: str  # relative to SRC, '/'-separated
    class_index: int
    size: int
    key: str = ""


@dataclass(frozen=True)
class Reject:
    relpath: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.relpath, "reason": self.reason}


@dataclass
class SourceDataset:
    root: Path
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, list[SourceFile]]
    rejects: dict[str, list[Reject]] = field(default_factory=dict)

    def class_table(self) -> list[dict]:
        return [{"index": i, "id": cid, "name": name}
                for i, (cid, name) in enumerate(zip(self.class_ids, self.class_names))]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folder: str) -> list[str]:
    """Every visible file under ``folder``, sorted; symlinked directories are not followed.

    Paths are plain strings: a scan of a million files is paid per file, and a ``Path`` object
    costs more than the ``stat`` of its file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
    return found


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


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size  # follows symlinks; a broken one raises
    except OSError:
        return None


def assign_keys(files: list[SourceFile]) -> list[SourceFile]:
    """Give each file a WebDataset-safe key from its stem, unique within the split.

    WebDataset splits a member name at the first dot, so keys hold no dots; clashes (the same
    stem in two class folders) get a numeric suffix in path order, which keeps keys stable.
    """
    seen: dict[str, int] = {}
    keyed = []
    for f in sorted(files, key=lambda f: f.relpath):
        # at most 80 characters, so "{key}.json" fits a plain ustar member name
        stem = _KEY_UNSAFE.sub("_", f.relpath.rpartition("/")[2].split(".")[0])[:80] or "sample"
        key = stem
        while key in seen:
            seen[stem] += 1
            key = f"{stem}_{seen[stem]}"
        seen.setdefault(key, 0)
        keyed.append(SourceFile(f.relpath, f.class_index, f.size, key))
    return keyed


def scan_source(src: str | Path, splits: list[str] | None = None) -> SourceDataset:
    """List a dataset's images per split. Raises ShardError if SRC is missing or holds no images."""
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

    # First pass: (relpath, class id) per split, so the class table can be the union of all splits.
    raw: dict[str, list[tuple[str, str | None]]] = {}
    class_ids: set[str] = set()
    for split in wanted:
        split_dir = root / split
        entries: list[tuple[str, str | None]] = []
        dirs = _class_dirs(split_dir)
        for class_id in dirs:
            class_ids.add(class_id)
            entries.extend((p, class_id) for p in _walk_files(str(split_dir / class_id)))
        loose = [os.path.join(split_dir, e.name) for e in sorted(os.scandir(split_dir), key=lambda e: e.name)
                 if _visible(e.name) and not e.is_dir()]
        if loose and kaggle_labels:
            for path in loose:
                class_id = kaggle_labels.get(os.path.basename(path).split(".")[0])
                entries.append((path, class_id))
                if class_id:
                    class_ids.add(class_id)
        raw[split] = entries

    ordered_ids = sorted(class_ids)
    index_of = {cid: i for i, cid in enumerate(ordered_ids)}
    dataset = SourceDataset(root, ordered_ids, _class_names(root, ordered_ids), {}, {})
    under_root = len(os.path.join(root, ""))  # every path found starts with the root and a separator
    for split, entries in raw.items():
        files, rejects = [], []
        for path, class_id in entries:
            rel = path[under_root:]
            if class_id is None:
                rejects.append(Reject(rel, f"no label in {KAGGLE_VAL_CSV}"))
                continue
            size = _file_size(path)
            if size is None:
                rejects.append(Reject(rel, "unreadable: broken symlink or vanished file"))
                continue
            files.append(SourceFile(rel, index_of[class_id], size))
        dataset.splits[split] = assign_keys(files)
        dataset.rejects[split] = rejects

    if not any(dataset.splits.values()):
        raise ShardError(f"SRC {root} holds no files in {', '.join(wanted)}: expected {wanted[0]}/<class>/<image>")
    return dataset
