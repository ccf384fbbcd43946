"""Sharding throughput against same-run baselines (issue: data_prep benchmarks).

- pass-through sharding vs ``tar -cf`` of the same files (7 pairs taken in turn, each from an empty
  output, medians compared, every pair recorded), on the 4,000 photographs below and, in the
  ``shard-100k`` suite, on a 100,000-file ImageNet-shaped tree where the cost per file, not the
  start-up, decides the ratio;
- re-encode sharding per core vs a minimal single-process PIL decode-resize-encode loop,
  and 2 workers vs 1;
- writing to SeaweedFS (S3) vs local disk.

``python -m bench.shard_bench scale [--images 10000 100000 1000000]`` runs the ``alexray shard`` command
on ImageNet-shaped trees from ``bench/imagenet_tree.py`` instead: time, peak memory, time to the first
shard, manifest size and ``alexray shard verify`` time at each size; at ``--resume-at`` sizes the
pass-through run is also SIGKILLed once half its shards are in DEST and run again (the cost of a
crash), and at ``--s3-at`` sizes both runs are repeated into a SeaweedFS server started for them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import WORK, bench_dataset, record, timed
from data_prep.pipeline import ShardConfig, shard_dataset

PASS_THROUGH_PAIRS = 7


def _shard(src: Path, dest: str, shard_size: int = 500, **options) -> None:
    if not dest.startswith("s3://"):
        shutil.rmtree(dest, ignore_errors=True)
    shard_dataset(src, dest, ShardConfig(progress=False, overwrite=True, shard_size=shard_size, **options))


def interleave(baseline, ours, clear, pairs: int) -> list[tuple[float, float]]:
    """(baseline seconds, ours seconds) of ``pairs`` runs taken in turn after one untimed warm-up of
    each; ``clear`` runs before every run, outside its time. Taken in turn, so a burst of load from
    elsewhere on the machine lands on both sides of a pair rather than on all runs of one side."""
    runs = []
    for i in range(pairs + 1):
        times = []
        for fn in (baseline, ours):
            clear()
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        if i:
            runs.append((times[0], times[1]))
    return runs


def _image_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))


def _pil_loop(files: list[Path], short_side: int, quality: int) -> None:
    for path in files:
        image = Image.open(path).convert("RGB")
        scale = short_side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=quality)


def pass_through(results: list, name: str, src: Path, members: list[str], n: int, out: Path, **options) -> None:
    """Pairs of ``tar -cf`` of SRC's ``members`` and our pass-through sharding of SRC, taken in turn."""
    with record(results, name, ">= 0.5") as r:
        baseline = WORK / f"baseline-{out.name}.tar"

        def clear() -> None:
            # Both start from an empty output: replacing a previous 200 MB output costs its deletion,
            # which one side would otherwise pay and the other not.
            baseline.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)

        load_before = os.getloadavg()
        pairs = interleave(lambda: subprocess.run(["tar", "-cf", str(baseline), "-C", str(src), *members], check=True),
                           lambda: _shard(src, str(out), **options), clear, PASS_THROUGH_PAIRS)
        clear()
        ratios = sorted(tar_s / ours_s for tar_s, ours_s in pairs)
        r.update(files=n, tar_img_s=round(n / statistics.median(t for t, _ in pairs)),
                 ours_img_s=round(n / statistics.median(o for _, o in pairs)),
                 ratio=round(statistics.median(ratios), 3), pair_ratios=[round(x, 3) for x in ratios],
                 tar_runs_s=[round(t, 3) for t, _ in pairs], ours_runs_s=[round(o, 3) for _, o in pairs],
                 load_avg_before=[round(x, 2) for x in load_before],
                 load_avg_after=[round(x, 2) for x in os.getloadavg()])


def imagenet_tree(images: int) -> Path:
    """An ImageNet-shaped tree of ``images`` files (``bench/imagenet_tree.py``) under WORK, written
    once and reused by later runs, like ``bench_dataset``; synced to disk when written, so that no
    timed run pays for the generator's writeback."""
    from bench.imagenet_tree import generate

    root = WORK / f"imagenet-tree-{images}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        generate(root, images)
        os.sync()
        (root / ".complete").touch()
        print(f"wrote {root} in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def run_100k(results: list) -> None:
    """Pass-through vs ``tar -cf`` at 100,000 files: tar takes a few seconds there, so the
    process start-up that dominates the 4,000-file comparison is a small part of either side."""
    images = 100_000
    src = imagenet_tree(images)
    print(f"shard benchmark on {images} files of {src}")
    # the whole dataset as alexray shard reads it: both splits and the val labels; default shard size
    pass_through(results, "shard pass-through vs tar -cf, 100k files", src,
                 ["train", "val", "LOC_val_solution.csv", "LOC_synset_mapping.txt"], images,
                 WORK / "out" / "pass-100k", shard_size=ShardConfig.shard_size)


def run(results: list) -> None:
    src = bench_dataset(per_class=400)
    files = _image_files(src / "train")
    n = len(files)
    out = WORK / "out"
    print(f"shard benchmarks on {n} images of {src}")

    pass_through(results, "shard pass-through vs tar -cf", src, ["train"], n, out / "pass")

    with record(results, "shard re-encode per core vs PIL loop", ">= 0.8") as r:
        base_s = timed(lambda: _pil_loop(files, 256, 90), repeat=2)
        one_s = timed(lambda: _shard(src, str(out / "re1"), resize_short_side=256, quality=90, workers=1), repeat=2)
        r.update(pil_img_s=round(n / base_s), ours_img_s=round(n / one_s), ratio=round(base_s / one_s, 3))

    with record(results, "shard re-encode 2 workers vs 1", ">= 1.7") as r:
        two_s = timed(lambda: _shard(src, str(out / "re2"), resize_short_side=256, quality=90, workers=2), repeat=2)
        r.update(one_img_s=round(n / one_s), two_img_s=round(n / two_s), ratio=round(one_s / two_s, 3))

    from tests.support.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="alexray-bench-s3-") as tmp, \
            S3Server(Path(tmp), volume_size_limit_mb=1024) as server:
        server.create_bucket("bench")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            with record(results, "shard re-encode to SeaweedFS vs local disk", ">= 0.8") as r:
                local_s = timed(lambda: _shard(src, str(out / "local"), resize_short_side=256), repeat=2)
                s3_s = timed(lambda: _shard(src, "s3://bench/shards", resize_short_side=256), repeat=2)
                r.update(local_img_s=round(n / local_s), s3_img_s=round(n / s3_s), ratio=round(local_s / s3_s, 3))
            # Pass-through moves ~60 KB per image as fast as the disk allows: the S3 server's own
            # ingest (on the same 2 cores) is the limit, not the sharding.
            with record(results, "shard pass-through to SeaweedFS vs local disk", "(information)") as r:
                local_s = timed(lambda: _shard(src, str(out / "local")))
                s3_s = timed(lambda: _shard(src, "s3://bench/pass"))
                r.update(local_img_s=round(n / local_s), s3_img_s=round(n / s3_s), ratio=round(local_s / s3_s, 3))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# --- ``python bench/shard_bench.py scale``: the CLI on generated ImageNet-shaped trees ---------------

def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) so far, in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _is_forkserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.forkserver" in f.read()
    except OSError:
        return False


def _tars_in(dest: Path) -> int:
    try:
        return sum(1 for e in os.scandir(dest) if e.name.endswith(".tar") and not e.name.startswith("."))
    except OSError:
        return 0


def measure_cli(args: list[str], dest: Path | None, kill_at_shards: int | None = None) -> dict:
    """Run ``alexray ARGS`` and watch it: wall time, time to the first shard in DEST (a local
    DEST only), peak RSS of the command's process and of its largest worker (sampled every 10 ms).

    With ``kill_at_shards``, SIGKILL the command and its workers once that many shards are in DEST,
    as a crash would."""
    alexray = str(Path(sys.executable).with_name("alexray"))
    started = time.perf_counter()
    proc = subprocess.Popen([alexray, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first_shard = None
    parent = worker = 0.0
    while proc.poll() is None:
        parent = max(parent, _peak_rss_mb(proc.pid) or 0.0)
        for child in _children(proc.pid):
            if _is_forkserver(child):
                for w in _children(child):
                    worker = max(worker, _peak_rss_mb(w) or 0.0)
        shards = _tars_in(dest) if dest is not None and (first_shard is None or kill_at_shards) else 0
        if first_shard is None and shards:
            first_shard = time.perf_counter() - started
        if kill_at_shards and shards >= kill_at_shards:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed_after_s": round(time.perf_counter() - started, 2), "shards_at_kill": _tars_in(dest)}
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"alexray {' '.join(args)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": round(seconds, 2), "first_shard_s": None if first_shard is None else round(first_shard, 2),
            "parent_peak_rss_mb": round(parent), "worker_peak_rss_mb": round(worker) or None,
            "stdout": out.decode()}


def _read_manifest(dest: str) -> bytes:
    from alexray_core.storage import open_storage

    return open_storage(dest).read_bytes("manifest.json")


def measure_mode(n: int, src: Path, dest: str, extra: list[str], resume: bool, verify: bool = True) -> dict:
    """One sharding of SRC into DEST (local or s3://), its verify, and with ``resume`` a second
    sharding killed half-way and run again."""
    local = None if dest.startswith("s3://") else Path(dest)
    args = ["shard", str(src), dest, "--no-progress", *extra]
    shard = measure_cli(args, local)
    print(f"{n} {dest}: {json.dumps({k: v for k, v in shard.items() if k != 'stdout'})}", flush=True)
    checked = measure_cli(["shard", "verify", dest, "--no-progress"], local) if verify else {"seconds": None}
    manifest = _read_manifest(dest)
    totals = json.loads(manifest)["totals"]
    shard.pop("stdout")
    row = {**shard, "img_s": round(n / shard["seconds"]), "manifest_kb": round(len(manifest) / 1e3),
           "shards": totals["shards"], "rejected": totals["rejected"], "verify_s": checked["seconds"]}
    if resume and local is not None:
        shutil.rmtree(local)
        killed = measure_cli(args, local, kill_at_shards=totals["shards"] // 2)
        again = measure_cli(args, local)
        if _read_manifest(dest) != manifest:
            raise RuntimeError("the resumed run's manifest differs from the uninterrupted run's")
        row["resume"] = {**killed, "resume_s": again["seconds"], "resume_stdout": again["stdout"].strip().splitlines()[-2],
                         "extra_cost_s": round(killed["killed_after_s"] + again["seconds"] - shard["seconds"], 2)}
    return row


def _s3_server(workdir: Path):
    from tests.support.s3server import S3Server

    server = S3Server(workdir, volume_size_limit_mb=1024).start()
    server.create_bucket("scale")
    os.environ.update(server.env())  # the alexray commands started from here inherit the endpoint
    return server


def run_scale(sizes: list[int], workdir: Path, resize: int, resume_at: set[int], s3_at: set[int],
              modes: list[str], out: Path, verify: bool = True) -> list[dict]:
    from bench.imagenet_tree import generate

    rows = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"alexray-scale-{n}-", dir=workdir))
        try:
            src = root / "src"
            started = time.perf_counter()
            counts = generate(src, n)
            gen_s = time.perf_counter() - started
            os.sync()  # the tree on disk before any timing: no run pays for the generator's writeback
            src_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 1e6
            row = {"images": n, "generate_s": round(gen_s, 1), "generate_files_s": round(n / gen_s),
                   "src_mb": round(src_mb, 1), "odd": counts["odd"], "load_avg": os.getloadavg()}
            rows.append(row)
            options = {"pass-through": [], "re-encode": ["--resize-short-side", str(resize)]}
            for mode, extra in ((m, options[m]) for m in modes):
                dest = root / mode
                row[mode] = measure_mode(n, src, str(dest), extra, resume=mode == "pass-through" and n in resume_at,
                                         verify=verify)
                os.sync()
                print(f"{n} {mode}: {json.dumps(row[mode])}", flush=True)
                shutil.rmtree(dest, ignore_errors=True)
                out.write_text(json.dumps(rows, indent=1))
            if n in s3_at:
                server = _s3_server(root / "s3")
                try:
                    for mode, extra in ((m, options[m]) for m in modes):
                        row[f"s3 {mode}"] = measure_mode(n, src, f"s3://scale/{mode}", extra, resume=False)
                        print(f"{n} s3 {mode}: {json.dumps(row[f's3 {mode}'])}", flush=True)
                        out.write_text(json.dumps(rows, indent=1))
                finally:
                    server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="bench/shard_bench.py", description="alexray shard on generated ImageNet-shaped trees")
    p.add_argument("what", choices=["scale"])
    p.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the trees and shards are written (and removed afterwards)")
    p.add_argument("--resize-short-side", type=int, default=64,
                   help="re-encode run: below the generated images' shortest side (80 px), so every one is re-encoded")
    p.add_argument("--resume-at", type=int, nargs="*", default=[1_000_000],
                   help="sizes at which the pass-through run is also killed half-way and resumed")
    p.add_argument("--s3-at", type=int, nargs="*", default=[100_000],
                   help="sizes also sharded to a SeaweedFS (S3) server started here")
    p.add_argument("--modes", nargs="+", choices=["pass-through", "re-encode"], default=["pass-through", "re-encode"],
                   help="which runs to make at each size (a million re-encodes take several minutes on 2 cores)")
    p.add_argument("--no-verify", action="store_true", help="skip 'alexray shard verify' after each run")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "scale.json"
    run_scale(args.images, args.workdir, args.resize_short_side, set(args.resume_at), set(args.s3_at),
              args.modes, out, verify=not args.no_verify)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
