"""Training at ImageNet scale: what grows with the shard count, the sample count and the checkpoint count.

At two sizes 10x apart (``--shards 128 1282``, 1,000 samples per shard, 1,000 classes; tiny real
JPEGs so the data writes in a minute or two):

- epoch planning: ``plan_epoch``, the rank's slices and what a stream cursor does before its first
  read (the segments from the start position), with ``data.streams`` 8 and 64;
- time to the first batch of ``train_batches`` from step 0 and from a resume near the middle and
  the end of the epoch (a cost that grew with the position would mean reading skipped samples);
- the loader's memory: RSS of a fresh process iterating ``train_batches`` (one rank that reads
  every stream: the most a rank can hold), before and along the iteration;
- with ``--checkpoints 100 1000``, a real ``alexray train`` on a local Ray cluster (HOME, TMPDIR and
  RAY_TMPDIR isolated) checkpointing every step with ``checkpoint.keep: 3``: size and file count of
  every part of the run directory, Ray's storage and Ray's temp dir afterwards, and the peak of the
  run's local scratch (checkpoints waiting for Ray's upload) sampled during the run.

``.venv/bin/python bench/train_scale.py`` runs it all: about 45 minutes on 2 cores, 35 of them the
1,000-checkpoint run (Ray takes one checkpoint per 2 s poll), and up to 8 GB of disk (3.9 GB of
shards, 3.7 GB of waiting checkpoints). ``--checkpoints`` with no value skips the Ray runs. The
data lives in a temp dir removed at the end. Results: Markdown on stdout and JSON in
``.bench/train_scale.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import WORK, timed  # noqa: E402

PER_SHARD, CLASSES, VAL_SHARDS = 1000, 1000, 2
GLOBAL_BATCH, SHUFFLE_BLOCK, IMAGE_SIZE, THREADS, SEED = 256, 1000, 64, 2, 0
RSS_STEPS = 400  # batches the memory child iterates (102,400 samples: the 128-shard epoch is 500 steps)


# ---- data --------------------------------------------------------------------------------------

def tiny_jpegs(count: int = 8, side: int = 24) -> list[bytes]:
    """Real JPEG bytes of a few distinct small images (smooth gradients plus seeded noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for i in range(count):
        y, x = np.mgrid[0:side, 0:side]
        base = np.stack([(x * 9 + i * 30) % 256, (y * 7 + i * 50) % 256, ((x + y) * 5 + i * 20) % 256], -1)
        pixels = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _write_shard(root: Path, split: str, index: int, jpegs: list[bytes], fingerprint: str) -> dict:
    from data_prep.shards import ShardResult, TarShardWriter, _HashingWriter, shard_name

    name = shard_name(split, index)
    with open(root / name, "wb", buffering=1 << 20) as raw:
        sink = _HashingWriter(raw)
        tar = TarShardWriter(sink)
        for i in range(PER_SHARD):
            n = index * PER_SHARD + i
            key, label = f"{split}/{n:08d}", n % CLASSES
            tar.add(f"{key}.jpg", jpegs[n % len(jpegs)])
            tar.add(f"{key}.cls", b"%d" % label)
            tar.add(f"{key}.json", b'{"class_id": "c%04d", "class_index": %d, "height": 24, "source": "synthetic", '
                                   b'"width": 24}' % (label, label))
        tar.close()
    return ShardResult(name, split, index, PER_SHARD, sink.count, sink.digest.hexdigest(), fingerprint).to_json()


def build_dataset(root: Path, shards: int) -> float:
    """``shards`` train shards and a small val split, with a manifest that passes check_dataset; seconds taken."""
    from data_prep.manifest import MANIFEST_NAME, build_manifest, check_dataset, dumps

    started = time.perf_counter()
    root.mkdir(parents=True)
    jpegs, fingerprint = tiny_jpegs(), f"bench-train-scale-{shards}"
    splits = {split: {"shards": [_write_shard(root, split, i, jpegs, fingerprint) for i in range(count)],
                      "rejected": []} for split, count in (("train", shards), ("val", VAL_SHARDS))}
    classes = [{"index": i, "id": f"c{i:04d}", "name": f"class {i}"} for i in range(CLASSES)]
    manifest = build_manifest(fingerprint, {"synthetic": True}, classes, splits)
    (root / MANIFEST_NAME).write_bytes(dumps(manifest))
    check_dataset(str(root), "train", "val", CLASSES)
    return time.perf_counter() - started


# ---- planning and first batch ------------------------------------------------------------------

def _quiet_threads(baseline: int) -> None:
    """Wait for a closed loader's decoding threads to leave, so they do not load the next timing."""
    deadline = time.monotonic() + 60
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)


def plan_times(dataset: str, streams: int) -> dict:
    from workers.data.loader import _StreamCursor, load_manifest, split_info
    from workers.data.sampling import plan_epoch, rank_slices

    manifest_s = timed(lambda: split_info(dataset, load_manifest(dataset), "train"), 3)
    split = split_info(dataset, load_manifest(dataset), "train")
    sizes = list(split.sizes)
    plan_s = timed(lambda: plan_epoch(sizes, GLOBAL_BATCH, streams, SEED, 1), 5)
    plan = plan_epoch(sizes, GLOBAL_BATCH, streams, SEED, 1)
    slices_s = timed(lambda: rank_slices(plan, 1, 0), 5)
    last = (plan.steps - 1) * plan.chunk  # the farthest a resume can start: every segment passed over
    cursors_s = timed(lambda: [_StreamCursor(split, plan, s, SHUFFLE_BLOCK, SEED, last) for s in range(streams)], 5)
    return {"manifest_ms": manifest_s * 1e3, "plan_ms": plan_s * 1e3, "slices_ms": slices_s * 1e3,
            "cursors_ms": cursors_s * 1e3, "segments": sum(len(s) for s in plan.streams), "steps": plan.steps}


def first_batch_seconds(dataset: str, streams: int, start_step: int, repeat: int = 2) -> float:
    """Seconds from the call (manifest read and epoch plan included) to the first batch in hand."""
    from workers.data.loader import load_manifest, split_info, train_batches
    from workers.data.sampling import plan_epoch

    baseline = threading.active_count()

    def once():
        split = split_info(dataset, load_manifest(dataset), "train")
        plan = plan_epoch(list(split.sizes), GLOBAL_BATCH, streams, SEED, 1)
        batches = train_batches(split, plan, 1, 0, start_step, SEED, IMAGE_SIZE, SHUFFLE_BLOCK, THREADS)
        batch = next(batches)
        assert batch.step == start_step and len(batch.keys) == GLOBAL_BATCH, (batch.step, len(batch.keys))
        batches.close()

    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - started)
        _quiet_threads(baseline)
    return best


# ---- memory (run in a fresh process) -----------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def rss_child(dataset: str, streams: int, steps: int) -> dict:
    import torch  # noqa: F401 - counted in the baseline, as in a training worker

    from workers.data.loader import load_manifest, split_info, train_batches
    from workers.data.sampling import plan_epoch

    out = {"imports_mb": _rss_mb()}
    split = split_info(dataset, load_manifest(dataset), "train")
    plan = plan_epoch(list(split.sizes), GLOBAL_BATCH, streams, SEED, 1)
    out["planned_mb"] = _rss_mb()
    samples, baseline = {}, threading.active_count()
    batches = train_batches(split, plan, 1, 0, 0, SEED, IMAGE_SIZE, SHUFFLE_BLOCK, THREADS)
    for count, batch in enumerate(batches, 1):
        del batch
        if count in (1, steps // 4, steps // 2, steps):
            samples[count] = _rss_mb()
        if count == steps:
            break
    batches.close()
    _quiet_threads(baseline)  # a decoding thread still running at exit aborts the interpreter
    out.update(first_mb=samples[1], at_quarter_mb=samples[steps // 4], at_half_mb=samples[steps // 2],
               at_end_mb=samples[steps], peak_mb=_peak_mb(), steps=steps)
    return out


def loader_memory(dataset: str, streams: int, steps: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--rss-child", dataset, str(streams), str(steps)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"memory child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- checkpoints on Ray -------------------------------------------------------------------------

def tree_usage(path: Path) -> tuple[int, int]:
    """(bytes on disk, files) under ``path``; (0, 0) when it does not exist."""
    size = files = 0
    if path.is_symlink():
        return 0, 0
    if path.is_file():
        return path.stat().st_size, 1
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
            files += 1
    return size, files


def largest_files(path: Path, count: int = 5) -> dict[str, tuple[int, int]]:
    found = []
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            try:
                found.append((os.lstat(full).st_size, os.path.relpath(full, path)))
            except FileNotFoundError:
                continue
    # Worker and controller ids are dropped from the names, so runs line up in the report.
    return {re.sub(r"-[0-9a-f]{20,}", "-*", name): (size, 1) for size, name in sorted(found, reverse=True)[:count]}


def _parts(base: Path) -> dict[str, tuple[int, int]]:
    """Usage of each entry directly under ``base``, and of its folders' entries one level down."""
    out: dict[str, tuple[int, int]] = {}
    if not base.exists():
        return out
    for entry in sorted(base.iterdir()):
        if entry.is_symlink():
            continue
        size, files = tree_usage(entry)
        # Names that carry a step or a date are summed, so runs of different lengths line up.
        name = re.sub(r"^checkpoint_e\d+_s\d+$", "checkpoint_e*_s* (all)", entry.name)
        name = re.sub(r"^session_\d.*", "session_* (all)", name)
        before = out.get(name, (0, 0))
        out[name] = (before[0] + size, before[1] + files)
        if name != entry.name:
            dirs = out.get(name.replace("(all)", "(count)"), (0, 0))
            out[name.replace("(all)", "(count)")] = (0, dirs[1] + 1)
    return out


def checkpoint_storage(dataset: str, steps: int, tmp: Path) -> dict:
    """A real ``alexray train`` on a fresh local Ray cluster, one checkpoint per step, keep 3."""
    import yaml

    home, tmpdir, storage = tmp / "home", tmp / "t", tmp / "runs"
    for folder in (home, tmpdir, storage):
        folder.mkdir(parents=True)
    name = f"ckpt{steps}"
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "run": {"name": name, "storage": str(storage)},
        "data": {"path": dataset, "val_split": None, "image_size": 64, "eval_resize": 64, "streams": 8,
                 "shuffle_block": 64, "num_workers": 1, "lighting_std": 0.0},
        "model": {"name": "alexnet", "width": 0.0625, "init": "kaiming", "dropout": 0.0},
        "train": {"epochs": 1, "max_steps": steps, "global_batch_size": 16, "lr": 0.001, "log_every": 100},
        "checkpoint": {"every_steps": 1, "keep": 3},
        "scaling": {"num_workers": 1},
    }))
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmpdir), "RAY_TMPDIR": str(tmpdir),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    run_dir, log = storage / name, tmp / "train.log"
    started, trained, peak = time.perf_counter(), None, (0, 0)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("alexray")), "train", str(spec)], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 3600
        # Checkpoints waiting for Ray's upload sit in the run's scratch dir: its peak, sampled here,
        # is gone by the end of the run.
        while proc.poll() is None:
            scratch = [tree_usage(p) for p in tmpdir.glob("alexray-run-*")]
            usage = (sum(u[0] for u in scratch), sum(u[1] for u in scratch))
            peak = max(peak, usage)
            if trained is None and _progress_step(run_dir) >= steps:
                trained = time.perf_counter() - started
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"alexray train ({steps} steps) failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "trained_s": trained, "scratch_peak": peak, "run_dir": _parts(run_dir), "storage": _parts(storage),
            "checkpoints": _parts(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else {},
            "home": _parts(home), "tmpdir": _parts(tmpdir), "ray_tmp": tree_usage(tmpdir / "ray"),
            "ray_sessions": _parts(tmpdir / "ray"), "ray_largest": largest_files(tmpdir / "ray" / "session_latest"), "all": {"run_dir": tree_usage(run_dir),
                                                            "storage": tree_usage(storage), "home": tree_usage(home),
                                                            "tmpdir": tree_usage(tmpdir)}}


def _progress_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


# ---- report -------------------------------------------------------------------------------------

def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KB"


def _growth(small: float, large: float) -> str:
    return f"{large / small:.2f}x" if small else "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs=2, default=[128, 1282], metavar=("SMALL", "LARGE"))
    parser.add_argument("--checkpoints", type=int, nargs="*", default=[100, 1000],
                        help="checkpoint counts of the Ray runs (none: skip them)")
    parser.add_argument("--rss-steps", type=int, default=RSS_STEPS, help="batches the memory measurement iterates")
    parser.add_argument("--checkpoints-only", action="store_true",
                        help="only the Ray runs, on the smaller dataset (prints their figures as JSON)")
    parser.add_argument("--rss-child", nargs=3, metavar=("DATASET", "STREAMS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))))
        return 0

    results: dict = {"shards": args.shards, "load_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                   time.gmtime())}
    tmp = Path(tempfile.mkdtemp(prefix="alexray-bench-scale-"))
    try:
        for shards in args.shards[:1] if args.checkpoints_only else args.shards:
            dataset = str(tmp / f"data-{shards}")
            written = build_dataset(Path(dataset), shards)
            entry = results.setdefault("sizes", {}).setdefault(str(shards), {"write_s": written})
            print(f"{shards} shards ({shards * PER_SHARD} samples) written in {written:.1f} s", flush=True)
            for streams in () if args.checkpoints_only else (8, 64):
                key = f"streams{streams}"
                entry[key] = {"plan": plan_times(dataset, streams)}
                steps = entry[key]["plan"]["steps"]
                entry[key]["first_batch_s"] = {str(s): first_batch_seconds(dataset, streams, s)
                                               for s in (0, 1, steps // 2, steps - 1)}
                entry[key]["memory"] = loader_memory(dataset, streams, min(args.rss_steps, steps))
                print(f"  streams {streams}: {json.dumps(entry[key])}", flush=True)
            if shards == min(args.shards):
                for count in args.checkpoints:
                    run_tmp = Path(tempfile.mkdtemp(prefix="ars-", dir="/tmp"))  # Ray's socket paths: <108 bytes
                    try:
                        results.setdefault("checkpoints", {})[str(count)] = checkpoint_storage(dataset, count, run_tmp)
                    finally:
                        shutil.rmtree(run_tmp, ignore_errors=True)
                    print(f"  {count} checkpoints: {json.dumps(results['checkpoints'][str(count)])}", flush=True)
            shutil.rmtree(dataset, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_end"] = os.getloadavg()
    if args.checkpoints_only:
        print(json.dumps(results, indent=1))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "train_scale.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    return 0


def report(results: dict) -> str:
    small, large = (str(s) for s in results["shards"])
    a, b = results["sizes"][small], results["sizes"][large]
    lines = [f"Measured {results['date']}, load average {results['load_start'][0]:.2f} at the start, "
             f"{results['load_end'][0]:.2f} at the end.", "",
             f"| per epoch, before the first read | streams | {small} shards | {large} shards | growth per 10x |",
             "|---|---|---|---|---|"]
    for streams in (8, 64):
        pa, pb = a[f"streams{streams}"]["plan"], b[f"streams{streams}"]["plan"]
        for key, what in (("manifest_ms", "manifest read + split info (ms)"), ("plan_ms", "`plan_epoch` (ms)"),
                          ("slices_ms", "`rank_slices` (ms)"), ("cursors_ms", "stream cursors at the last step (ms)")):
            lines.append(f"| {what} | {streams} | {pa[key]:.2f} | {pb[key]:.2f} | {_growth(pa[key], pb[key])} |")
    lines += ["", f"| first batch (s), world 1 | streams | {small} shards | {large} shards | growth per 10x |",
              "|---|---|---|---|---|"]
    for streams in (8, 64):
        fa, fb = a[f"streams{streams}"]["first_batch_s"], b[f"streams{streams}"]["first_batch_s"]
        labels = ("start (step 0)", "step 1", "middle", "last step")
        for label, (ka, va), (kb, vb) in zip(labels, fa.items(), fb.items()):
            lines.append(f"| {label} (steps {ka} / {kb}) | {streams} | {va:.2f} | {vb:.2f} | {_growth(va, vb)} |")
    lines += ["", f"| loader RSS (MB), world 1 | streams | {small} shards | {large} shards | growth per 10x |",
              "|---|---|---|---|---|"]
    for streams in (8, 64):
        ma, mb = a[f"streams{streams}"]["memory"], b[f"streams{streams}"]["memory"]
        for key, what in (("imports_mb", "after imports"), ("planned_mb", "manifest + plan"),
                          ("first_mb", "first batch"), ("at_quarter_mb", f"batch {ma['steps'] // 4}"),
                          ("at_half_mb", f"batch {ma['steps'] // 2}"), ("at_end_mb", f"batch {ma['steps']}"),
                          ("peak_mb", "peak (VmHWM)")):
            lines.append(f"| {what} | {streams} | {ma[key]:.0f} | {mb[key]:.0f} | {_growth(ma[key], mb[key])} |")
    if results.get("checkpoints"):
        counts = list(results["checkpoints"])
        runs = [results["checkpoints"][c] for c in counts]
        lines += ["", "| after N checkpoints (keep 3) | " + " | ".join(f"{c}: size, files" for c in counts) + " |",
                  "|---|" + "---|" * len(counts)]
        rows: dict[str, list] = {}
        for i, run in enumerate(runs):
            for group, label in (("run_dir", "run dir"), ("checkpoints", "run dir checkpoints"),
                                 ("storage", "storage"), ("home", "HOME"), ("tmpdir", "TMPDIR"),
                                 ("ray_sessions", "Ray temp dir"), ("ray_largest", "Ray temp dir, largest")):
                for part, usage in run.get(group, {}).items():
                    rows.setdefault(f"{label}/{part}", [None] * len(runs))[i] = usage
            for part, usage in run["all"].items():
                rows.setdefault(f"total {part}", [None] * len(runs))[i] = usage
        for name, usages in rows.items():
            cells = " | ".join("-" if u is None else f"{_size(u[0])}, {u[1]}" for u in usages)
            lines.append(f"| `{name}` | {cells} |")
        lines.append("| scratch peak during the run (checkpoints waiting for Ray) | " +
                     " | ".join(f"{_size(r['scratch_peak'][0])}, {r['scratch_peak'][1]}" if "scratch_peak" in r else "-"
                                for r in runs) + " |")
        lines.append("| seconds to the last step / to the end of the job | " + " | ".join(
            f"{r['trained_s']:.0f} / {r['seconds']:.0f}" if r.get("trained_s") else f"- / {r['seconds']:.0f}"
            for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
