"""Models trained by the workers: the 2012 AlexNet, torchvision's AlexNet, any torchvision classifier.

Plain PyTorch, no Ray: the training loop builds a model with `build_model(name, num_classes, width)`
and wraps it in DDP itself. Everything here is channels_last friendly (only convolutions, pooling,
LRN and a flatten before the fully connected layers).

`width` scales the channel counts and the hidden FC size of the two AlexNets so that tests and the
CPU demo can use a narrow model with the same layer structure as the real one (width=0.25 with 10
classes has 3.6 M parameters instead of 61 M).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from alexray_core.spec import JobSpec, SpecError

__all__ = [
    "AlexNet",
    "AlexNetTV",
    "alexnet_tv",
    "build_model",
    "build_model_on_meta",
    "model_names",
    "classifier_head",
    "model_kwargs",
]

# Local response normalisation of the paper (section 3.3): k=2, n=5, alpha=1e-4, beta=0.75.
# nn.LocalResponseNorm divides alpha by n like Caffe's reference bvlc_alexnet does; the paper's
# formula (alpha not divided by n) would be alpha=5e-4 here. The effect on training is small.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def _scaled(channels: int, width: float, multiple: int = 1) -> int:
    """`channels * width` rounded to a multiple of `multiple` (at least `multiple`).

    Grouped convolutions need channel counts divisible by the number of groups, so the paper model
    rounds to a multiple of 2 when its 2-group convolutions are on. width=1.0 gives `channels`.
    """
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"model.width: must be a number > 0, got {width!r}")
    return float(width)


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model.num_classes: must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """FC6, FC7 (with dropout before each) and FC8, indexed like torchvision's: fc6 = 1, fc7 = 4, fc8 = 6."""
    return nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class AlexNet(nn.Module):
    """The network of Krizhevsky, Sutskever and Hinton (NIPS 2012).

    A 227x227 input gives the paper's feature maps: conv1 55x55x96, pool1 27x27x96,
    conv2 27x27x256, pool2 13x13x256, conv3 13x13x384, conv4 13x13x384, conv5 13x13x256,
    pool5 6x6x256, so fc6 sees 9216 inputs. With the 2-group convolutions in conv2/4/5 (the paper
    split them over two GPUs) and 1000 classes it has exactly 60,965,224 parameters.

    Pooling uses ceil rounding like the original Caffe/cuda-convnet layers: identical to floor
    rounding at 227 px, and it makes a 224 px input give the same 27/13/6 maps after conv1 (54x54)
    and keeps small inputs (64 px on the CPU) from pooling down to nothing. Any other input size
    is brought to 6x6 by an adaptive average pool before the classifier; at 6x6 it is skipped.

    The classifier returns logits; the softmax lives in the loss.

    `init="paper"` (default) is the paper's initialisation, see `reset_parameters`. It was made
    for mean-subtracted 0..255 pixels: with inputs normalised to unit variance, and more so in a
    narrow model, the logits hardly depend on the input at first (about 1e-4 of the input's scale
    at width 1.0), so training sits at chance for a while. `init="kaiming"` (He normal for conv
    and hidden FC layers, zero biases) learns from the first steps and suits narrow CPU models.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, groups: bool = True,
                 dropout: float = 0.5, init: str = "paper"):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {dropout!r}")
        if init not in ("paper", "kaiming"):
            raise ValueError(f"model.init: unknown init {init!r}; choose paper or kaiming")
        self.num_classes = num_classes
        self.width = width
        self.groups = bool(groups)
        self.init = init
        g = 2 if self.groups else 1
        c1, c2, c3, c4, c5 = (_scaled(c, width, g) for c in (96, 256, 384, 384, 256))
        hidden = _scaled(4096, width, g)

        def lrn() -> nn.LocalResponseNorm:
            return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, c1, kernel_size=11, stride=4)),
            ("relu1", nn.ReLU(inplace=True)),
            ("norm1", lrn()),
            ("pool1", pool()),
            ("conv2", nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=g)),
            ("relu2", nn.ReLU(inplace=True)),
            ("norm2", lrn()),
            ("pool2", pool()),
            ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=g)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=g)),
            ("relu5", nn.ReLU(inplace=True)),
            ("pool5", pool()),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(c5 * 6 * 6, hidden, num_classes, dropout)
        self.reset_parameters()

    # Layers whose bias the paper sets to 1 so the ReLUs start with positive inputs.
    _BIAS_ONE = ("features.conv2", "features.conv4", "features.conv5", "classifier.1", "classifier.4")

    def reset_parameters(self) -> None:
        """Initialise every layer according to `self.init`.

        "paper": weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
        (fc6, fc7), which gives the ReLUs positive inputs early on, and 0 in conv1, conv3 and the
        output layer. "kaiming": He normal weights (fan_in, ReLU gain) and zero biases, except the
        output layer, which keeps N(0, 0.01) so the first logits are near zero.
        """
        output = f"classifier.{len(self.classifier) - 1}"
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if self.init == "paper" or name == output:
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            paper_one = self.init == "paper" and name in self._BIAS_ONE
            nn.init.constant_(module.bias, 1.0 if paper_one else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2:] != (6, 6):
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    @torch.no_grad()
    def feature_shapes(self, x: torch.Tensor) -> OrderedDict[str, tuple[int, ...]]:
        """Shape (C, H, W) of the output of every conv and pool stage for input `x` (N, 3, H, W).

        Returns e.g. {"conv1": (96, 55, 55), "pool1": (96, 27, 27), ...} for a 227 input; the conv
        entries are taken after their ReLU (same shape).
        """
        shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        for name, layer in self.features.named_children():
            x = layer(x)
            if name.startswith(("conv", "pool")):
                shapes[name] = tuple(x.shape[1:])
        return shapes


class AlexNetTV(nn.Module):
    """torchvision's AlexNet (the "one weird trick" single-tower variant), with a width factor.

    64/192/384/256/256 filters, no LRN, floor pooling, adaptive average pool to 6x6, dropout and
    4096-wide FC layers: 61,100,840 parameters for 1000 classes. Module names and indices match
    torchvision.models.AlexNet, so at width 1.0 its state_dicts load into each other.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.width = width
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = _scaled(4096, width)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(c5 * 6 * 6, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet_tv(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> AlexNetTV:
    """torchvision's AlexNet layout with PyTorch's default initialisation (no weights loaded)."""
    return AlexNetTV(num_classes=num_classes, width=width, dropout=dropout)


_BUILTINS = {
    "alexnet": AlexNet,
    "alexnet_tv": alexnet_tv,
}


def model_names() -> list[str]:
    """Names of the models built here; any torchvision classifier name is accepted as well."""
    return list(_BUILTINS)


def _torchvision_classifiers() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# GoogLeNet and Inception v3 warn at every build that their default initialisation (truncated
# normal) will change in a later torchvision: asking for it explicitly keeps runs initialised alike
# across torchvision versions. Their other defaults without weights suit training here: the
# auxiliary classifiers on (their losses join the main one: workers.training.loop.training_loss)
# and transform_input off (it maps inputs to the [-1, 1] range of the weights torchvision ported
# from TensorFlow; these runs feed ImageNet-normalised crops).
_TORCHVISION_DEFAULTS = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}


def build_model(name: str = "alexnet", num_classes: int = 1000, width: float = 1.0,
                **kwargs) -> nn.Module:
    """Build a freshly initialised model by name; never downloads weights.

    "alexnet" (the paper's network, default) and "alexnet_tv" take `width` and their constructor
    keywords (`groups`, `dropout`, `init`). Any other torchvision classification model ("resnet18",
    "resnet50", "mobilenet_v3_small", ...) is built by torchvision.models.get_model with
    weights=None; those have no width factor, so width != 1.0 is refused rather than ignored.
    """
    _check_num_classes(num_classes)
    width = _check_width(width)
    if not isinstance(name, str):
        raise ValueError(f"model.name: must be a string such as 'alexnet', got {name!r}")
    key = name.strip().lower()
    if key in _BUILTINS:
        return _BUILTINS[key](num_classes=num_classes, width=width, **kwargs)
    known = _torchvision_classifiers()
    if key not in known:
        close = difflib.get_close_matches(key, [*_BUILTINS, *known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(
            f"model.name: unknown model {name!r}{hint}; choose alexnet, alexnet_tv or a torchvision "
            f"classifier such as resnet18 (torchvision.models.list_models(module=torchvision.models) "
            f"lists them)")
    if width != 1.0:
        raise SpecError(f"model.width: {width} is only supported by {', '.join(model_names())}; "
                        f"torchvision model {key!r} needs width 1.0")
    import torchvision

    kwargs = {**_TORCHVISION_DEFAULTS.get(key, {}), **kwargs}
    return torchvision.models.get_model(key, weights=None, num_classes=num_classes, **kwargs)


# The factories that allocate a layer's parameters and buffers. Other factories (torch.arange,
# torch.tensor, ...) make the small tensors some constructors compute with and read back (RegNet's
# stage widths: torch.arange(...).tolist()), which meta tensors cannot be.
_ALLOCATORS = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
                         torch.randn, torch.eye})


class _AllocateOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_model_on_meta(name: str = "alexnet", num_classes: int = 1000, width: float = 1.0,
                        **kwargs) -> nn.Module:
    """``build_model``'s network with its weights on the meta device: shapes without memory or
    initialisation, so that the largest torchvision classifiers build in a fraction of a second.

    ``with torch.device("meta")`` would put every tensor there, and RegNet's constructor cannot
    read its own arithmetic back from meta tensors; here only the allocations go there, and the
    few small buffers made from values (BatchNorm's batch counter) stay on the CPU."""
    with _AllocateOnMeta():
        return build_model(name, num_classes, width, **kwargs)


def model_kwargs(spec: JobSpec) -> dict:
    """The constructor keywords of ``spec.model`` for ``build_model`` (torchvision models take none)."""
    m = spec.model
    if m.name == "alexnet":
        return {"groups": m.groups, "dropout": m.dropout, "init": m.init}
    if m.name == "alexnet_tv":
        return {"dropout": m.dropout}
    return {}


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Dotted name and module of the final classification layer, e.g. ("classifier.6", Linear)
    for both AlexNets, ("fc", Linear) for ResNets, ("heads.head", Linear) for ViT.

    The head is the last nn.Linear registered in the model: torchvision classifiers define their
    head after the body and after any auxiliary heads (GoogLeNet, Inception v3), and wrappers
    (DDP's "module.", torch.compile's "_orig_mod.") just prefix the name.
    """
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = (name, module)
    if head is None:
        raise ValueError(f"model has no nn.Linear classification layer ({type(model).__name__}); "
                         "replace its head by hand")
    return head


def class_probabilities(model: nn.Module, images: torch.Tensor, channels_last: bool = False,
                        use_bf16: bool = False) -> torch.Tensor:
    """Class probabilities for uint8 crops ``(N, C, H, W)``, or for stacks of crops ``(N, K, C, H, W)``
    averaged over each stack (the paper's 10-crop evaluation averages the predictions, not the logits)."""
    from workers.data.transforms import to_model_input

    crops = images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if crops > 1 else images
    x = to_model_input(flat, None, channels_last, torch.float32)
    with torch.autocast(flat.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x).float()
    return logits.softmax(-1).view(len(images), crops, -1).mean(1)
