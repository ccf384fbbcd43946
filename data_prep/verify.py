"""``alexray shard verify DEST``: re-read the manifest and every shard, report each mismatch."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from alexray_core.storage import open_storage
from alexray_core.storage.api import Storage
from alexray_core.storage.hashing import Sha256Reader

from .executor import Progress
from .images import ImageOptions, RejectedImage, decode_image, open_image
from .manifest import MANIFEST_NAME, parse_manifest


@dataclass
class VerifyReport:
    dest: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(storage: Storage, entry: dict, num_classes: int, decode: bool) -> tuple[int, list[str], list[str]]:
    """Check one shard against its manifest entry; returns (samples, keys, problems)."""
    name, problems = entry["name"], []
    info = storage.info(name)
    if info is None:
        return 0, [], [f"{name}: missing"]
    if info.size != entry["bytes"]:
        problems.append(f"{name}: size {info.size} != manifest {entry['bytes']}")
    reader = Sha256Reader(storage.iter_chunks(name))
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                members.setdefault(key, {})[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: not a readable tar ({e})")
    if reader.finish() != entry["sha256"]:  # finish: hash what the tar reader left unread (padding)
        problems.append(f"{name}: sha256 differs from the manifest")
    options = ImageOptions()
    for key, parts in members.items():
        missing = {"jpg", "cls", "json"} - parts.keys()
        if missing:
            problems.append(f"{name}: sample {key} lacks {', '.join(sorted(missing))}")
            continue
        try:
            cls = int(parts["cls"])
            meta = json.loads(parts["json"])
        except ValueError:
            problems.append(f"{name}: sample {key} has an unreadable .cls or .json")
            continue
        if not 0 <= cls < num_classes or meta.get("class_index") != cls:
            problems.append(f"{name}: sample {key} has class {cls}, outside 0..{num_classes - 1} or unlike its .json")
        try:
            image = open_image(parts["jpg"], options.max_pixels)
            if image.format != "JPEG" or image.mode != "RGB":
                problems.append(f"{name}: sample {key} is {image.format} {image.mode}, not an RGB JPEG")
            elif decode:
                decode_image(image)
        except RejectedImage as e:
            problems.append(f"{name}: sample {key}: {e}")
    if len(members) != entry["samples"]:
        problems.append(f"{name}: {len(members)} samples != manifest {entry['samples']}")
    return len(members), list(members), problems


def verify_dataset(dest: str, decode: bool = False, workers: int = 4, progress: bool = True) -> VerifyReport:
    storage = open_storage(dest)
    storage.check_reachable()
    report = VerifyReport(storage.url)
    if not storage.exists(MANIFEST_NAME):
        report.problems.append(f"{storage.join(MANIFEST_NAME)} is missing: the sharding never finished; rerun 'alexray shard'")
        return report
    manifest = parse_manifest(storage.read_bytes(MANIFEST_NAME), storage.join(MANIFEST_NAME))
    num_classes = len(manifest["classes"])
    entries = [(split, e) for split, part in manifest["splits"].items() for e in part["shards"]]
    bar = Progress("verifying", sum(e["samples"] for _, e in entries), progress)
    seen_keys: dict[str, set[str]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(split, pool.submit(verify_shard, storage, e, num_classes, decode)) for split, e in entries]
        for split, future in futures:
            count, keys, problems = future.result()
            report.shards += 1
            report.samples += count
            report.problems.extend(problems)
            split_keys = seen_keys.setdefault(split, set())
            duplicates = split_keys.intersection(keys)
            if duplicates:
                report.problems.append(f"{split}: keys in more than one shard, e.g. {sorted(duplicates)[0]}")
            split_keys.update(keys)
            bar.update(report.samples, 0)
    bar.close()
    for split, part in manifest["splits"].items():
        if part["samples"] != sum(e["samples"] for e in part["shards"]):
            report.problems.append(f"{split}: manifest total {part['samples']} != sum of its shards")
    return report
