"""``manifest.json``: the one file that says what a shard directory holds.

It is written last, so its presence means every shard it lists is complete. This module documents
and checks the format: every reader parses it with ``parse_manifest``, and a job's class count is
checked against it by ``check_num_classes``.

```
{
  "format": "alexray-shards", "format_version": 1,
  "fingerprint": "<sha256 of the inputs and the options that shape the output>",
  "options": {...},
  "num_classes": 1000,
  "classes": [{"index": 0, "id": "n01440764", "name": "tench"}, ...],
  "splits": {
    "train": {"samples": N, "bytes": B, "shards": [{"name": "train-000000.tar", "samples": n,
               "bytes": b, "sha256": "..."}, ...],
              "rejected": [{"path": "train/n01440764/x.JPEG", "reason": "truncated image: ..."}]},
    ...
  },
  "totals": {"samples": N, "bytes": B, "shards": S, "rejected": R}
}
```
"""

from __future__ import annotations

import json

from alexray_core.storage import StorageError, open_storage

from .errors import ShardError

MANIFEST_NAME = "manifest.json"
FORMAT = "alexray-shards"
FORMAT_VERSION = 1


def build_manifest(fingerprint: str, options: dict, classes: list[dict],
                   splits: dict[str, dict]) -> dict:
    """``splits`` maps split -> {"shards": [ShardResult.to_json()...], "rejected": [...]}."""
    out_splits = {}
    for split, part in splits.items():
        shards = [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                  for s in sorted(part["shards"], key=lambda s: s["index"])]
        rejected = sorted(part["rejected"], key=lambda r: r["path"])
        out_splits[split] = {
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
            "rejected": rejected,
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "options": options,
        "num_classes": len(classes),
        "classes": classes,
        "splits": out_splits,
        "totals": {
            "samples": sum(p["samples"] for p in out_splits.values()),
            "bytes": sum(p["bytes"] for p in out_splits.values()),
            "shards": sum(len(p["shards"]) for p in out_splits.values()),
            "rejected": sum(len(p["rejected"]) for p in out_splits.values()),
        },
    }


def parse_manifest(data: bytes, where: str) -> dict:
    """Parse and sanity-check a manifest; raises ShardError naming what is wrong."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where} is not valid JSON ({e}); re-run 'alexray shard' to rewrite it", 1) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{where} is not an alexray shard manifest; point at a directory made by 'alexray shard'", 1)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{where} has format_version {manifest.get('format_version')!r}, "
                         f"this alexray reads {FORMAT_VERSION}; re-shard or upgrade alexray", 1)
    for key in ("splits", "classes", "fingerprint"):
        if key not in manifest:
            raise ShardError(f"{where} lacks the field {key!r}; re-run 'alexray shard' to rewrite it", 1)
    return manifest


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def check_dataset(path: str, train_split: str, val_split: str | None, num_classes: int | None) -> dict:
    """The manifest at ``path`` (a job's ``data.path``), checked against what a training job asks of
    it: the splits have samples and the class count matches. Raises ShardError naming the spec field."""
    try:
        storage = open_storage(path)
        storage.check_reachable()
        if not storage.exists(MANIFEST_NAME):
            raise ShardError(f"no {MANIFEST_NAME} in {path}; shard a dataset there with 'alexray shard SRC {path}' "
                             "or fix the path")
        manifest = parse_manifest(storage.read_bytes(MANIFEST_NAME), f"{path}/{MANIFEST_NAME}")
    except (ShardError, StorageError) as e:
        raise ShardError(f"data.path: {e}", 2) from None
    splits = manifest.get("splits") or {}
    for field, split in (("data.train_split", train_split), ("data.val_split", val_split)):
        if split is None:
            continue
        if split not in splits or not splits[split].get("samples"):
            have = ", ".join(sorted(s for s in splits if splits[s].get("samples"))) or "none"
            raise ShardError(f"{field}: the dataset at {path} has no samples in split {split!r} (splits: {have}); "
                             f"set {field} to one of them" + (" or null" if field == "data.val_split" else ""), 2)
    check_num_classes(manifest, num_classes, path)
    return manifest


def check_num_classes(manifest: dict, num_classes: int | None, path: str) -> int:
    """The dataset's class count; a ShardError naming ``model.num_classes`` when it asks for another
    (None: whatever the dataset has)."""
    classes = manifest.get("num_classes", len(manifest.get("classes") or []))
    if num_classes is not None and num_classes != classes:
        raise ShardError(f"model.num_classes: {num_classes} does not match the {classes} classes of the dataset at "
                         f"{path}; set it to {classes} or leave it unset", 2)
    return classes
