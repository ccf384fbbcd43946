#!/usr/bin/env bash
# bench/gpu.py on a GPU machine, in one go of under 10 minutes; results as JSON under $OUT.
#
# The machine has Python with torch and torchvision but maybe none of the loader's other
# dependencies, and no network. So, first, on a machine with the repository's venv and a network:
#
#     bash bench/gpu_device_run.sh prepare
#
# puts wheels (webdataset, braceexpand, pyyaml, tqdm, prometheus-client, opencv-python-headless;
# about 55 MiB) in .bench/wheels and scikit-learn's two sample photographs in .bench/photos (both
# ignored by git: carry them with the working tree). Then, on the GPU machine, from the repository root:
#
#     OUT=/some/dir bash bench/gpu_device_run.sh
#
# (A dry run on a CPU machine: IMAGES=64 EXTRA=--quick OUT=/tmp/out bash bench/gpu_device_run.sh)
#
# Wheels of modules the machine lacks are unpacked into a private folder put on PYTHONPATH (no pip,
# no install into the machine's Python). Stages, each with its own time limit, each writing its
# JSON as it goes: make 8192 photographs and shard them at 256 px (about 30 s on 16 cores); the
# loaders alone and the paths' parity, and training without torch.compile (256 and 512); decode
# per core (one thread, one core); training with torch.compile; then the training loop itself
# (python -m workers train, no Ray) for 30 steps with data.decode cpu and gpu, its summary.json
# each. The logs go, one after the other, to stages.log: at most 8 files come back from a run.
set -u
cd "$(dirname "$0")/.."
WHEELS=.bench/wheels
PHOTOS=.bench/photos

if [ "${1:-}" = prepare ]; then
    mkdir -p "$WHEELS" "$PHOTOS"
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$WHEELS" webdataset==1.0.2 braceexpand pyyaml tqdm prometheus-client opencv-python-headless==5.0.0.93
    images=$(.venv/bin/python -c 'import os, sklearn.datasets as d; print(os.path.join(os.path.dirname(d.__file__), "images"))')
    cp "$images/china.jpg" "$images/flower.jpg" "$PHOTOS/"
    du -sh "$WHEELS" "$PHOTOS"
    exit 0
fi

: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/alexray-gpu-bench}
SITE=${SITE:-/tmp/alexray-site}
IMAGES=${IMAGES:-8192}
read -r -a EXTRA <<<"${EXTRA:-}"  # more bench/gpu.py arguments for every stage
mkdir -p "$OUT" "$DATA" "$SITE"
started=$(date +%s)
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, its log appended to stages.log
    local name=$1 limit=$2 log
    shift 2
    log=$(mktemp)
    echo "== $name (limit ${limit}s, at $(($(date +%s) - started))s)"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    echo "   exit $? after $(($(date +%s) - started))s"
    tail -n 5 "$log"
    { echo "== $name"; cat "$log"; } >>"$OUT/stages.log"
    rm -f "$log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    nproc
    "$PY" -c 'import sys, torch, torchvision; print(sys.version); print(torch.__version__, torchvision.__version__, torch.version.cuda)'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# module -> wheel name prefix, for what this Python cannot import
for pair in webdataset:webdataset braceexpand:braceexpand yaml:pyyaml tqdm:tqdm prometheus_client:prometheus_client \
    cv2:opencv_python_headless; do
    module=${pair%%:*}
    wheel=${pair##*:}
    if ! PYTHONPATH="$SITE" "$PY" -c "import $module" 2>/dev/null; then
        for file in "$WHEELS/$wheel"-*.whl; do
            [ -f "$file" ] && "$PY" -m zipfile -e "$file" "$SITE" && echo "unpacked $(basename "$file")"
        done
    fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PHOTO_ARGS=()
"$PY" -c 'import sklearn' 2>/dev/null || PHOTO_ARGS=(--photos "$PHOTOS")

stage make-data 120 "$PY" bench/gpu.py --make-data "$DATA" --images "$IMAGES" ${PHOTO_ARGS[@]+"${PHOTO_ARGS[@]}"} --paths synthetic \
    --decode-only ${EXTRA[@]+"${EXTRA[@]}"}
stage eager 150 "$PY" bench/gpu.py --data "$DATA/shards" --compile off --json "$OUT/eager.json" ${EXTRA[@]+"${EXTRA[@]}"}
OMP_NUM_THREADS=1 stage per-core 60 taskset -c 0 "$PY" bench/gpu.py --data "$DATA/shards" --decode-only --threads 1 \
    --header-threads 1 --batch 256 --steps 10 --warmup 2 --json "$OUT/per-core.json" ${EXTRA[@]+"${EXTRA[@]}"}
stage compiled 140 "$PY" bench/gpu.py --data "$DATA/shards" --compile on --train-only --json "$OUT/compiled.json" ${EXTRA[@]+"${EXTRA[@]}"}
# The training loop as a run uses it: its own threads (data.num_workers), bf16, channels_last.
cat >"$DATA/loop.yaml" <<SPEC
run: {storage: $DATA/runs}
data: {path: $DATA/shards, val_split: null, num_workers: ${LOOP_THREADS:-8}}
train: {epochs: 1, global_batch_size: ${LOOP_BATCH:-256}, max_steps: 30, log_every: 10}
checkpoint: {every_steps: 0}
scaling: {num_workers: 1}
SPEC
for decode in cpu gpu; do
    ALEXRAY_METRICS=0 stage "loop-$decode" 50 "$PY" -m workers train "$DATA/loop.yaml" --set "run.name=loop-$decode-$started" \
        --set "data.decode=$decode"
    cp "$DATA/runs/loop-$decode-$started/summary.json" "$OUT/loop-$decode.json" 2>/dev/null
done
echo "done in $(($(date +%s) - started))s"
