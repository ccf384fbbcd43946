"""Model FLOPs per sample against a count made by hand from the layer shapes, the peak table, a peak
given by hand, and MFU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.models import flops
from workers.models.architectures import build_model

SIZE = 224


def _by_hand(model: nn.Module, size: int) -> tuple[float, float]:
    """(forward, training) FLOPs of one sample from each conv and linear layer's shapes: 2 x the
    multiply-adds of every conv and linear layer, times 3 for training (the backward's weight and
    input gradients each cost what the forward does)."""
    macs = []

    def record(module, inputs, output):
        per_sample = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(per_sample * module.in_channels // module.groups * kh * kw)
        else:
            macs.append(per_sample * module.in_features)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    forward = 2 * sum(macs)
    return forward, 3 * forward


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # no 61M-parameter initialisation: only shapes matter here
        return build_model(name, **kwargs)


@pytest.mark.parametrize("name, kwargs", [
    ("alexnet", {}),
    ("alexnet", {"groups": False}),
    ("alexnet_tv", {}),
    ("alexnet", {"width": 0.25, "num_classes": 10}),
])
def test_counted_flops_match_the_layer_shapes(name, kwargs):
    model = _meta_model(name, **kwargs)
    forward, training = _by_hand(model, SIZE)
    counted_forward = flops.forward_flops_per_sample(model, SIZE)
    counted = flops.training_flops_per_sample(model, SIZE)
    assert counted_forward == pytest.approx(forward, rel=0.01)
    assert counted == pytest.approx(training, rel=0.01)  # a forward-only count fails


def test_the_paper_alexnet_costs_what_the_docs_say():
    model = _meta_model("alexnet")
    # 1.44 GFLOP forward at 224 px (the paper's 227 px: 724 M multiply-adds, docs/scaling.md)
    assert flops.forward_flops_per_sample(model, SIZE) == pytest.approx(1.441e9, rel=1e-3)
    assert flops.forward_flops_per_sample(model, 227) == pytest.approx(2 * 724.4e6, rel=1e-3)
    assert flops.training_flops_per_sample(model, SIZE) == pytest.approx(3 * 1.441e9, rel=1e-3)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Dropout(0.5), nn.Linear(32, 5))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("where", ["meta", "cpu"])
def test_counting_leaves_the_model_and_the_rng_alone(where):
    torch.manual_seed(3)
    model = _Small().train()
    model.body[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert flops._count(model, 16, where) > 0  # "cpu": the path taken for ops without meta kernels
    assert torch.equal(rng, torch.get_rng_state())  # dropout drew nothing from the run's generator
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN statistics, batches tracked
    assert model.training


def test_both_paths_count_the_same_and_wrappers_are_seen_through():
    model = _Small()
    on_meta, on_cpu = flops._count(model, 16, "meta"), flops._count(model, 16, "cpu")
    assert on_meta == on_cpu
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like from outside
    assert flops.training_flops_per_sample(wrapper, 16) == 3 * on_meta


@pytest.mark.parametrize("name, bf16, tflops", [
    ("NVIDIA H200", True, 989.4),
    ("NVIDIA H200 NVL", True, 835.5),
    ("NVIDIA GH200 480GB", True, 989.4),
    ("NVIDIA H100 80GB HBM3", True, 989.4),
    ("NVIDIA H100 80GB HBM3", False, 494.7),
    ("NVIDIA H100 PCIe", True, 756.5),
    ("NVIDIA A100-SXM4-80GB", True, 312.0),
    ("NVIDIA A100-PCIE-40GB", False, 156.0),
    ("NVIDIA A10G", True, 125.0),
    ("NVIDIA A10", True, 125.0),
    ("NVIDIA L4", True, 121.0),
    ("NVIDIA L40S", True, 362.05),
    ("NVIDIA L40", False, 90.5),
    ("Tesla V100-SXM2-16GB", True, 125.0),
    ("Tesla V100-PCIE-32GB", False, 14.0),
    ("Tesla T4", True, 65.0),
    ("NVIDIA GeForce RTX 4090", True, 165.2),
])
def test_peaks_are_found_by_device_name(name, bf16, tflops):
    assert flops.peak_flops_for_name(name, bf16) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA GeForce GTX 1080", "AMD Instinct MI300X", "NVIDIA A1000", ""])
def test_an_unknown_device_has_no_peak(name):
    assert flops.peak_flops_for_name(name, True) is None


def test_the_override_wins_and_the_cpu_has_no_peak():
    assert flops.device_peak_flops("cpu", True) is None
    assert flops.device_peak_flops(torch.device("cpu"), False, 0.0) is None
    assert flops.device_peak_flops("cpu", True, 2.5) == 2.5e12
    assert flops.mfu(1000.0, 4e9, 16e12) == pytest.approx(0.25)
    assert flops.mfu(1000.0, 4e9, None) is None and flops.mfu(None, 4e9, 1e12) is None


def test_training_counts_the_auxiliary_classifiers_and_evaluation_does_not():
    """GoogLeNet runs its two auxiliary classifiers in training only: a training sample's FLOPs are 3x
    the forward with them, evaluation's forward has none; each module keeps its own mode."""
    from workers.models.architectures import build_model_on_meta

    model = build_model_on_meta("googlenet", 10)
    forward, training = flops.forward_flops_per_sample(model, SIZE), flops.training_flops_per_sample(model, SIZE)
    assert forward == _by_hand(model.eval(), SIZE)[0]
    with_aux = _by_hand(model.train(), SIZE)[0]
    assert training == 3 * with_aux and with_aux > forward  # small heads: 0.4% of the forward at 224 px
    model.aux1.eval()
    flops.training_flops_per_sample(model, SIZE), flops.forward_flops_per_sample(model, SIZE)
    assert model.training and not model.aux1.training and model.aux2.training
