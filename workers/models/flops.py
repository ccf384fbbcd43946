"""Model FLOP utilisation (MFU): the FLOPs of one training sample, the device's dense peak, their ratio.

The FLOPs are counted once from the run's own model at the run's image size by
``torch.utils.flop_counter.FlopCounterMode``: a forward pass of a batch of 2 on the ``meta`` device
(shapes only, no arithmetic, no memory), through ``torch.func.functional_call`` with meta copies of
the parameters and buffers, so the model's weights, BatchNorm statistics and the RNG are untouched.
Only convolutions and matrix products are counted (a multiply-add is two FLOPs); pooling, LRN,
activations and bias additions are left out, as MFU conventionally does.

A training sample is counted as 3x its forward pass, the *model FLOPs* of the MFU literature (PaLM,
Chowdhery et al. 2022): the backward computes a weight gradient and an input gradient per layer,
each as many FLOPs as the forward. What the kernels execute differs a little (the first layer's
input gradient is never computed: about 5% less for AlexNet at 224 px), and is not what MFU
measures: the same model at the same speed has the same MFU whatever the kernels skip or redo.
For the paper's AlexNet at 224 px: 1.44 GFLOP forward, 4.32 GFLOP per training sample.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["training_flops_per_sample", "forward_flops_per_sample", "peak_flops_for_name",
           "device_peak_flops", "mfu", "PEAKS"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BATCH = 2  # a batch of 1 can take other kernels' shapes (BatchNorm refuses it in training mode)

# Dense peaks in TFLOP/s as (name pattern, bf16, fp32), first match wins, from NVIDIA's datasheets,
# whose headline tensor figures are "with sparsity": those are halved here.
# - bf16: BF16 tensor cores with FP32 accumulate. The V100 and T4 have no BF16 tensor cores: their
#   FP16 tensor figure stands in, so a bf16 run on them (which PyTorch runs without tensor cores)
#   shows how little of the device it uses.
# - fp32: TF32 tensor cores from Ampere on, because PyTorch lets cuDNN run fp32 convolutions (92% of
#   AlexNet's FLOPs) in TF32 by default (torch.backends.cudnn.allow_tf32); plain FP32 before Ampere.
# H200 SXM / NVL: 1,979 / 1,671 BF16, 989 / 835 TF32 (H200 datasheet). H100 SXM / PCIe / NVL:
# 1,979 / 1,513 / 1,671 BF16, 989 / 756 / 835 TF32 (H100 datasheet); GH200 as H100 SXM. A100 40 and
# 80 GB, SXM and PCIe: 624 BF16, 312 TF32. A10: 250 BF16, 125 TF32; NVIDIA publishes no datasheet of
# AWS's A10G and the A10's figures are used (if the A10G's tensor cores run at half rate, as on
# GeForce parts, its MFU reads half the truth: set train.peak_tflops). L40S: 733 BF16, 366 TF32.
# L40: 362.1 BF16, 181 TF32. L4: 242 BF16, 120 TF32. V100 SXM2 / PCIe: 125 / 112 FP16 tensor,
# 15.7 / 14 FP32. T4: 65 FP16 tensor, 8.1 FP32. RTX 4090: 330.3 BF16 (FP32 accumulate), 165.2 TF32
# (Ada whitepaper). RTX 3090: 142 BF16 (FP32 accumulate), 71 TF32 (Ampere GA102 whitepaper).
PEAKS: tuple[tuple[str, float, float], ...] = (
    (r"H200 NVL", 835.5, 417.5),
    (r"H200", 989.4, 494.7),  # also GH200
    (r"H100 NVL", 835.5, 417.5),
    (r"H100 PCIe", 756.5, 378.0),
    (r"H100", 989.4, 494.7),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312.0, 156.0),
    (r"\bA10G\b", 125.0, 62.5),
    (r"\bA10\b", 125.0, 62.5),
    (r"\bL40S\b", 362.05, 183.0),
    (r"\bL40\b", 181.05, 90.5),
    (r"\bL4\b", 121.0, 60.0),
    (r"V100.*PCIE", 112.0, 14.0),
    (r"V100", 125.0, 15.7),
    (r"\bT4\b", 65.0, 8.1),
    (r"RTX 4090", 165.2, 82.6),
    (r"RTX 3090", 71.0, 35.6),
)


def _plain(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _count(model: nn.Module, image_size: int, device: str) -> float:
    """Forward FLOPs of one sample, counted on ``device`` ("meta", or "cpu" for ops without meta kernels)."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    model = _plain(model)
    # The model's own tensors are never handed in: meta copies cost nothing, CPU copies keep the
    # run's weights and BatchNorm statistics out of reach of this pass.
    state = {name: torch.empty_like(t, device="meta") if device == "meta" else t.detach().to("cpu", copy=True)
             for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(_BATCH, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[]), counter, torch.no_grad():
        functional_call(model, state, (x,))
    return counter.get_total_flops() / _BATCH


def _count_anywhere(model: nn.Module, image_size: int, training: bool) -> float:
    """``_count`` in training or evaluation mode (GoogLeNet and Inception v3 run their auxiliary
    classifiers in training only), each module put back in its own mode afterwards."""
    modes = [(module, module.training) for module in _plain(model).modules()]
    _plain(model).train(training)
    for module in _plain(model).modules():
        # Uncounted, and the same shapes in either mode; in training mode its batch statistics on
        # meta tensors run through torch's Python decompositions, a third of the pass's time.
        if isinstance(module, _BATCH_NORMS):
            module.eval()
    try:
        return _count(model, image_size, "meta")
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on real CPU tensors
        if any(t.is_meta for t in _plain(model).parameters()):
            raise  # a model built on meta has no values to copy: what the meta pass said is the answer
        return _count(model, image_size, "cpu")
    finally:
        for module, mode in modes:
            module.training = mode


def training_flops_per_sample(model: nn.Module, image_size: int, device=None) -> float:
    """Model FLOPs of one training sample (forward and backward: 3x the forward) of ``model`` on
    ``image_size`` px squares, auxiliary classifiers included.

    ``device`` is accepted for symmetry with the training loop and not used: the count depends on
    shapes only. About 0.03 s for AlexNet once torch's reference kernels are imported (the training
    worker imports them anyway; the first meta pass of a bare process imports them, about 1.5 s).
    The pass raises what the model raises at this size: ``workers.models.input_size`` checks a
    run's model with it before any worker starts.
    """
    return 3 * _count_anywhere(model, image_size, training=True)


def forward_flops_per_sample(model: nn.Module, image_size: int) -> float:
    """FLOPs of one sample's forward pass in evaluation mode (evaluation, inference, export)."""
    return _count_anywhere(model, image_size, training=False)


def peak_flops_for_name(name: str, bf16: bool) -> float | None:
    """The dense peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``), else None."""
    for pattern, bf16_tflops, fp32_tflops in PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return (bf16_tflops if bf16 else fp32_tflops) * 1e12
    return None


def device_peak_flops(device, bf16: bool, override_tflops: float = 0.0) -> float | None:
    """FLOP/s one device can do: ``override_tflops`` when > 0, else the table's entry for the GPU,
    else None (the CPU, an unknown GPU: no MFU without a peak given)."""
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), bf16)


def mfu(images_per_s: float | None, flops_per_sample: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: the fraction of ``peak`` FLOP/s the samples' FLOPs use; None without a peak."""
    if images_per_s is None or not flops_per_sample or not peak or peak <= 0:
        return None
    return images_per_s * flops_per_sample / peak
