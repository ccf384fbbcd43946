"""The arithmetic of docs/scaling.md: AlexNet DDP scaling efficiency and what the data path needs.

    python docs/scaling.py                     # every table of docs/scaling.md, in its order
    python docs/scaling.py --rate A100=9400    # the same with a measured single-GPU rate
                                               # (bench/gpu.py's synthetic images/s at batch 128)

Only the standard library: the model is a handful of formulas, written out here so that anyone can
check them and so that the doc's tables can be regenerated (tests/test_cluster_configs.py checks
that the doc holds exactly what this script prints).

The model, per training step of one GPU with a per-GPU batch ``b`` (weak scaling: the per-GPU batch
stays fixed as GPUs are added):

- compute ``T = b / R`` with ``R`` the GPU's images/s alone; forward ``T/3``, backward ``2T/3``
  (the usual 1:2 split; the optimizer step is inside ``T``);
- ring all-reduce moves ``2(N-1)/N x bytes`` through the slowest link of the ring: NVLink (or PCIe)
  inside one node, the node's network card across nodes (a flat ring crosses each node boundary
  once per direction, so the card carries one GPU's share, not eight);
- DDP overlaps communication with the backward pass bucket by bucket. AlexNet's fully connected
  layers (96% of the bytes) come last in the forward pass, so their gradients are ready first, after
  the FC share of the backward (8% of the multiply-adds); their all-reduce then runs while the
  convolutions' backward runs. The convolutions' gradients (4% of the bytes) are ready only when
  the backward ends: that last bucket is never hidden;
- step time = when the last all-reduce ends; efficiency = T / step time.

Latency terms (tens of microseconds per bucket), NCCL's use of SMs while it overlaps, and stragglers
are left out: the figures are upper bounds of what DDP can reach.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

# --- AlexNet as in the 2012 paper (workers/models/architectures.py `alexnet`, groups=True, 1000 classes) --------
# (name, output side, output channels, input channels per group, kernel side); FC layers have side 1.
CONV = [
    ("conv1", 55, 96, 3, 11),
    ("conv2", 27, 256, 48, 5),     # 2 groups: each filter sees half of conv1's 96 maps
    ("conv3", 13, 384, 256, 3),
    ("conv4", 13, 384, 192, 3),    # 2 groups
    ("conv5", 13, 256, 192, 3),    # 2 groups
]
FC = [("fc6", 6 * 6 * 256, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]

CONV_PARAMS = sum(ch * cin * k * k + ch for _, _, ch, cin, k in CONV)
FC_PARAMS = sum(i * o + o for _, i, o in FC)
PARAMS = CONV_PARAMS + FC_PARAMS                                    # 60,965,224
CONV_MACS = sum(side * side * ch * cin * k * k for _, side, ch, cin, k in CONV)
FC_MACS = sum(i * o for _, i, o in FC)
MACS = CONV_MACS + FC_MACS                                          # per image, forward
TRAIN_GFLOP = 3 * 2 * MACS / 1e9                                    # forward + backward, per image

FP32, BF16 = 4, 2                                                   # bytes per gradient value
GB = 1e9
BATCH = 128                                                         # per GPU: the paper's batch
USABLE = 0.85                                                       # of a network's line rate
NETWORKS_GBIT = (100, 400)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Gpu:
    name: str
    instance: str            # the AWS instance the row stands for
    rate: float              # images/s of one GPU alone at BATCH, bf16 autocast, channels_last
    rate_source: str
    gpus_per_node: int
    intra_gbs: float         # all-reduce bus bandwidth inside one node, GB/s
    intra_link: str
    cores_per_gpu: float     # physical cores per GPU on that instance
    peak_tflops: float       # dense bf16


# Single-GPU rates are estimates (no GPU figure from bench/gpu.py yet): the training FLOPs per image
# (TRAIN_GFLOP = 4.35) at 11% of dense bf16 peak on the A100 and 7% on the H100. AlexNet uses a
# GPU poorly: conv1 has 3 input channels, LRN and max-pool are memory-bound, the batch is small.
GPUS = {
    "A10G": Gpu("A10G", "g5.12xlarge", 2_800, "estimate", 4, 12.0, "PCIe 4.0 (no NVLink)", 6.0, 125.0),
    "A100": Gpu("A100", "p4d.24xlarge", 8_000, "estimate", 8, 230.0, "NVLink 3 / NVSwitch", 6.0, 312.0),
    "H100": Gpu("H100", "p5.48xlarge", 16_000, "estimate", 8, 360.0, "NVLink 4 / NVSwitch", 12.0, 989.0),
}

# Decoding rates per core, measured on this project's 2-core machine (BENCHMARKS.md, loader suite:
# batches/s x 64 images / 2 cores; RandomResizedCrop(224) + flip, uint8, ready for the model).
DECODE_PER_CORE = {"resized shards": 53.6 * 64 / 2, "original JPEGs": 34.0 * 64 / 2, "torchvision": 14.8 * 64 / 2}
DECODE_WHAT = {
    "resized shards": "alexray loader (OpenCV, threads), shards written with --resize-short-side 256 --quality 90",
    "original JPEGs": "alexray loader, original 500x375 JPEGs (about 60 KB)",
    "torchvision": "torchvision ImageFolder + DataLoader processes (PIL), original JPEGs",
}
# Bytes read per image: a 256-px q90 re-encode is about 30 KB (FIELD_NOTES); ImageNet's training
# JPEGs average about 110 KB (about 140 GB for 1.28 M images).
IMAGE_KB = {"resized shards": 30, "original JPEGs": 110}
TRAINER_CORES = 1.0   # per GPU: the training loop's Python thread, NCCL's proxy thread, the metrics


def allreduce_s(n: int, nbytes: float, gbs: float) -> float:
    """Seconds for a bandwidth-optimal ring all-reduce of ``nbytes`` over ``n`` GPUs at ``gbs`` GB/s."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbs * GB)


def link_gbs(gpu: Gpu, n: int, network_gbit: float) -> float:
    """Bandwidth of the slowest link of the ring: inside one node, or the node's network card."""
    return gpu.intra_gbs if n <= gpu.gpus_per_node else network_gbit / 8 * USABLE


def step(gpu: Gpu, n: int, network_gbit: float, grad_bytes: int, batch: int = BATCH) -> dict:
    """One DDP step of ``n`` GPUs: compute, communication, what of it stays exposed, efficiency."""
    t = batch / gpu.rate
    t_fwd, t_bwd = t / 3, 2 * t / 3
    fc_ready = t_fwd + t_bwd * FC_MACS / MACS
    gbs = link_gbs(gpu, n, network_gbit)
    comm_fc = allreduce_s(n, FC_PARAMS * grad_bytes, gbs)
    comm_conv = allreduce_s(n, CONV_PARAMS * grad_bytes, gbs)
    end = max(fc_ready + comm_fc, t) + comm_conv if n > 1 else t
    return {"compute_s": t, "comm_s": comm_fc + comm_conv, "exposed_s": end - t, "step_s": end,
            "efficiency": t / end, "images_per_s": n * batch / end}


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def constants_table() -> str:
    rows = [
        ("parameters", f"{PARAMS:,}", f"conv {CONV_PARAMS:,} + FC {FC_PARAMS:,} ({FC_PARAMS / PARAMS:.1%} FC)"),
        ("fp32 gradients per step", f"{PARAMS * FP32 / 1e6:.1f} MB", "4 bytes per parameter"),
        ("bf16 gradients per step", f"{PARAMS * BF16 / 1e6:.1f} MB", "DDP's bf16 compression hook"),
        ("forward multiply-adds per image", f"{MACS / 1e6:.1f} M", f"FC {FC_MACS / MACS:.1%} of them"),
        ("training FLOPs per image", f"{TRAIN_GFLOP:.2f} GFLOP", "3 x forward (forward + 2 x backward)"),
        ("ring all-reduce bytes per GPU", "2(N-1)/N x gradient bytes", "1.75x at 8 GPUs, 1.97x at 64"),
        ("usable network bandwidth", f"{USABLE:.0%} of line rate",
         ", ".join(f"{g} Gb/s -> {g / 8 * USABLE:.1f} GB/s" for g in NETWORKS_GBIT)),
    ]
    out = ["| quantity | value | note |", "|---|---:|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def gpus_table() -> str:
    out = ["| GPU | instance | images/s alone (batch 128) | step compute | GPUs/node | inside a node | "
           "all-reduce GB/s | physical cores/GPU | % of bf16 peak |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for g in GPUS.values():
        mfu = g.rate * TRAIN_GFLOP / (g.peak_tflops * 1e3)
        out.append(f"| {g.name} | {g.instance} | {g.rate:,.0f} ({g.rate_source}) | {_ms(BATCH / g.rate)} ms | "
                   f"{g.gpus_per_node} | {g.intra_link} | {g.intra_gbs:.0f} | {g.cores_per_gpu:.0f} | {mfu:.0%} |")
    return "\n".join(out)


def scaling_table(gpu: Gpu) -> str:
    head = ["GPUs"]
    for net in NETWORKS_GBIT:
        head += [f"{net} Gb/s fp32", f"{net} Gb/s bf16"]
    head += ["img/s (400 Gb/s, bf16)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in GPU_COUNTS:
        cells = [str(n)]
        for net in NETWORKS_GBIT:
            for nbytes in (FP32, BF16):
                cells.append(f"{step(gpu, n, net, nbytes)['efficiency']:.0%}")
        cells.append(f"{step(gpu, n, NETWORKS_GBIT[-1], BF16)['images_per_s']:,.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def timing_table(gpu: Gpu, n: int = 16) -> str:
    """Where the time of one step goes at ``n`` GPUs, for each network and precision."""
    out = ["| network | gradients | compute ms | all-reduce ms | exposed ms | step ms | efficiency |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for net in NETWORKS_GBIT:
        for label, nbytes in (("fp32", FP32), ("bf16", BF16)):
            s = step(gpu, n, net, nbytes)
            out.append(f"| {net} Gb/s | {label} | {_ms(s['compute_s'])} | {_ms(s['comm_s'])} | "
                       f"{_ms(s['exposed_s'])} | {_ms(s['step_s'])} | {s['efficiency']:.0%} |")
    return "\n".join(out)


def data_table() -> str:
    """Cores per GPU each loader needs to feed each GPU at its single-GPU rate, and the bytes it reads."""
    names = list(DECODE_PER_CORE)
    out = ["| GPU | images/s to feed | " + " | ".join(f"cores/GPU, {k}" for k in names) +
           " | cores/GPU on the instance | " + " | ".join(f"read Gb/s per node, {k}" for k in IMAGE_KB) + " |",
           "|---|---:|" + "---:|" * len(names) + "---:|" + "---:|" * len(IMAGE_KB)]
    for g in GPUS.values():
        cells = [g.name, f"{g.rate:,.0f}"]
        cells += [f"{g.rate / DECODE_PER_CORE[k] + TRAINER_CORES:.1f}" for k in names]
        cells.append(f"{g.cores_per_gpu:.0f}")
        cells += [f"{g.rate * g.gpus_per_node * kb * 1e3 * 8 / 1e9:.1f}" for kb in IMAGE_KB.values()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def decode_table() -> str:
    out = ["| loader | what | images/s per core |", "|---|---|---:|"]
    out += [f"| {k} | {DECODE_WHAT[k]} | {v:,.0f} |" for k, v in DECODE_PER_CORE.items()]
    return "\n".join(out)


def tables(gpus: dict[str, Gpu] | None = None) -> dict[str, str]:
    """Every table of docs/scaling.md by the name of its marker there, in the doc's order."""
    global GPUS
    saved, GPUS = GPUS, gpus or GPUS
    try:
        out = {"constants": constants_table(), "gpus": gpus_table()}
        for name, g in GPUS.items():
            out[f"scaling-{name}"] = scaling_table(g)
        out["timing-A100-16"] = timing_table(GPUS["A100"], 16)
        out["timing-H100-64"] = timing_table(GPUS["H100"], 64)
        out["decode"] = decode_table()
        out["data"] = data_table()
        return out
    finally:
        GPUS = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", action="append", default=[], metavar="GPU=IMAGES_PER_S",
                   help=f"a measured single-GPU rate at batch {BATCH} (GPUs: {', '.join(GPUS)})")
    args = p.parse_args(argv)
    gpus = dict(GPUS)
    for item in args.rate:
        name, _, value = item.partition("=")
        if name not in gpus or not value:
            p.error(f"--rate {item!r}: expected GPU=IMAGES_PER_S with GPU one of {', '.join(gpus)}")
        gpus[name] = replace(gpus[name], rate=float(value), rate_source="measured")
    for name, table in tables(gpus).items():
        print(f"<!-- table:{name} -->\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
