"""Helpers for the sharding tests: run the CLI, read shards back, compare runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_alexray(*args, env: dict | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``alexray`` command in a subprocess; returns the completed process."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"alexray {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def start_alexray(*args, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *map(str, args)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failed command must print (progress bars aside)."""
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr[-2000:]}"
    return lines[0]


def read_tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def shard_contents(manifest: dict, read) -> dict[str, list[dict]]:
    """split -> list of sample dicts (key, class, meta, image) for every shard, via ``read(name)``."""
    out = {}
    for split, part in manifest["splits"].items():
        rows = []
        for shard in part["shards"]:
            for key, parts in read_tar_samples(read(shard["name"])).items():
                meta = json.loads(parts["json"])
                image = Image.open(io.BytesIO(parts["jpg"]))
                rows.append({"key": key, "shard": shard["name"], "cls": int(parts["cls"]), "meta": meta,
                             "format": image.format, "mode": image.mode, "size": image.size})
        out[split] = rows
    return out


