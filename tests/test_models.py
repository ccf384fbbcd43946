"""workers.models.architectures: the paper AlexNet, torchvision's AlexNet, the registry and the classifier head."""

import json

import pytest
import torch
import torchvision
from torch import nn

from alexray_core.spec import SpecError
from workers.models.architectures import (
    AlexNet,
    AlexNetTV,
    alexnet_tv,
    build_model,
    classifier_head,
    model_kwargs,
    model_names,
)

PAPER_PARAMS = 60_965_224  # 2-group conv2/4/5, 1000 classes
PAPER_PARAMS_NO_GROUPS = 62_378_344  # + half of conv2, conv4, conv5 again: 307,200 + 663,552 + 442,368
TORCHVISION_PARAMS = 61_100_840


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def paper() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet()


def test_paper_parameter_count(paper):
    assert n_params(paper) == PAPER_PARAMS
    # 96% of the parameters are in the FC layers (what DDP all-reduces each step)
    fc = sum(p.numel() for p in paper.classifier.parameters())
    assert fc / PAPER_PARAMS > 0.96


def test_without_groups_the_count_is_larger():
    model = AlexNet(groups=False)
    assert n_params(model) == PAPER_PARAMS_NO_GROUPS
    assert n_params(model) - PAPER_PARAMS == 307_200 + 663_552 + 442_368
    assert model.features.conv2.groups == 1


def test_paper_feature_maps_on_227(paper):
    shapes = paper.feature_shapes(torch.zeros(1, 3, 227, 227))
    assert shapes == {
        "conv1": (96, 55, 55), "pool1": (96, 27, 27),
        "conv2": (256, 27, 27), "pool2": (256, 13, 13),
        "conv3": (384, 13, 13), "conv4": (384, 13, 13),
        "conv5": (256, 13, 13), "pool5": (256, 6, 6),
    }
    assert paper.classifier[1].in_features == 6 * 6 * 256
    # 224 px reaches the same maps from pool1 on (ceil pooling)
    shapes = paper.feature_shapes(torch.zeros(1, 3, 224, 224))
    assert shapes["pool1"] == (96, 27, 27) and shapes["pool5"] == (256, 6, 6)


def test_layers_lrn_and_groups(paper):
    f = paper.features
    assert [name for name, _ in f.named_children()] == [
        "conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2",
        "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5"]
    assert (f.conv1.kernel_size, f.conv1.stride) == ((11, 11), (4, 4))
    assert (f.conv2.kernel_size, f.conv2.padding) == ((5, 5), (2, 2))
    assert [getattr(f, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    for norm in (f.norm1, f.norm2):
        assert isinstance(norm, nn.LocalResponseNorm)
        assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 2.0)
    for pool in (f.pool1, f.pool2, f.pool5):
        assert (pool.kernel_size, pool.stride) == (3, 2)
    drops = [m.p for m in paper.classifier if isinstance(m, nn.Dropout)]
    assert drops == [0.5, 0.5]
    assert [m.out_features for m in paper.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 1000]


def test_paper_initialisation(paper):
    layers = {
        "conv1": paper.features.conv1, "conv2": paper.features.conv2, "conv3": paper.features.conv3,
        "conv4": paper.features.conv4, "conv5": paper.features.conv5,
        "fc6": paper.classifier[1], "fc7": paper.classifier[4], "fc8": paper.classifier[6],
    }
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, layer in layers.items():
        expected = 1.0 if name in ones else 0.0
        assert torch.all(layer.bias == expected), name
        assert abs(layer.weight.mean().item()) < 1e-3, name
    # 37.7 M samples: the std is 0.01 to well under 1%
    assert paper.classifier[1].weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert paper.features.conv3.weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_kaiming_init_option():
    model = AlexNet(num_classes=10, width=0.25, init="kaiming")
    conv3 = model.features.conv3
    fan_in = conv3.in_channels * 9
    assert conv3.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model.classifier[6].weight.std().item() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="model.init"):
        AlexNet(init="xavier")


def test_torchvision_variant_matches_torchvision():
    ours = alexnet_tv()
    theirs = torchvision.models.alexnet(weights=None)
    assert isinstance(ours, AlexNetTV)
    assert n_params(ours) == n_params(theirs) == TORCHVISION_PARAMS
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    ten = alexnet_tv(num_classes=10)
    assert n_params(ten) == n_params(torchvision.models.alexnet(weights=None, num_classes=10))


@pytest.mark.parametrize("name", ["alexnet", "alexnet_tv"])
@pytest.mark.parametrize("size", [64, 224])
def test_narrow_model_runs_on_small_and_standard_inputs(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, width=0.25).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        # channels_last gives the same logits
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)


def test_width_rounds_to_even_channels_with_groups():
    model = AlexNet(num_classes=3, width=0.1)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 2 == 0 and c.out_channels >= 2 for c in convs)
    assert [c.out_channels for c in convs] == [10, 26, 38, 38, 26]
    tiny = AlexNet(num_classes=3, width=0.001)
    assert {c.out_channels for c in tiny.features if isinstance(c, nn.Conv2d)} == {2}
    assert tiny(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert AlexNet(num_classes=3, width=0.1, groups=False).features.conv1.out_channels == 10


def test_build_model_registry():
    assert model_names() == ["alexnet", "alexnet_tv"]
    assert isinstance(build_model("alexnet", 1000), AlexNet)
    assert n_params(build_model("alexnet", 1000, groups=False)) == PAPER_PARAMS_NO_GROUPS
    assert isinstance(build_model(" AlexNet_TV ", 10), AlexNetTV)
    resnet = build_model("resnet18", num_classes=10)
    assert isinstance(resnet, torchvision.models.ResNet)
    assert resnet.fc.out_features == 10
    with torch.no_grad():
        assert resnet.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_build_model_errors():
    unknown = r"model.name: unknown model 'alexnetx' \(did you mean 'alexnet'\?\); choose alexnet, alexnet_tv"
    with pytest.raises(SpecError, match=unknown + ".*resnet18"):
        build_model("alexnetx", 10)
    with pytest.raises(ValueError, match="model.name"):
        build_model(None, 10)
    with pytest.raises(SpecError, match="model.name"):
        build_model("fasterrcnn_resnet50_fpn", 10)  # a detection model, not a classifier
    with pytest.raises(SpecError, match="model.width"):
        build_model("resnet18", 10, width=0.5)
    with pytest.raises(ValueError, match="model.width"):
        build_model("alexnet", 10, width=0)
    for bad in (1, 0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_classes"):
            build_model("alexnet", bad)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 1)


def test_classifier_head_names():
    assert classifier_head(AlexNet(num_classes=5, width=0.25))[0] == "classifier.6"
    assert classifier_head(alexnet_tv(num_classes=5, width=0.25))[0] == "classifier.6"
    name, head = classifier_head(build_model("resnet18", 5))
    assert name == "fc" and head.out_features == 5
    name, head = classifier_head(build_model("mobilenet_v3_small", 5))
    assert name == "classifier.3" and head.out_features == 5
    with pytest.raises(ValueError, match="nn.Linear"):
        classifier_head(nn.Sequential(nn.Conv2d(3, 4, 1)))


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_a_finetuning_start_copies_the_body_and_keeps_the_fresh_head(name, tmp_path):
    """workers.models.pretrained.load_backbone on a fresh run's model: every layer but the last comes from
    the source checkpoint; the last keeps build_model's initialisation, sized for the new classes."""
    from alexray_core.spec import load_spec
    from workers.models import checkpoint_format as ckpt
    from workers.models.pretrained import load_backbone

    width = 0.25 if name == "alexnet" else 1.0
    source_dir = tmp_path / "source"
    spec = load_spec(None, ["data.path=/data/shards", f"model.name={name}", f"model.width={width}",
                            f"finetune.from_checkpoint={json.dumps(str(source_dir))}"])
    torch.manual_seed(1)
    source = build_model(name, 10, width, **model_kwargs(spec)).state_dict()
    info = {"name": name, "num_classes": 10, "width": width, "kwargs": model_kwargs(spec)}
    ckpt.save(source_dir, 0, ckpt.TrainState(model=info), source, {}, world_size=1)
    torch.manual_seed(0)
    model = build_model(name, 3, width, **model_kwargs(spec))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    head, _ = classifier_head(model)

    assert load_backbone(model, spec) == str(source_dir)
    after = model.state_dict()
    assert set(after) == set(fresh)
    for key, value in after.items():
        assert torch.equal(value, fresh[key] if key.startswith(f"{head}.") else source[key]), key
    assert after[f"{head}.weight"].shape == (3, source[f"{head}.weight"].shape[1])
    if name == "alexnet":  # the paper's output layer: N(0, 0.01) weights, zero biases
        assert torch.all(after[f"{head}.bias"] == 0) and 0.008 < after[f"{head}.weight"].std() < 0.012
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_narrow_alexnet_overfits_two_random_classes():
    """30 SGD steps separate 16 fixed random 64 px images into 2 classes: gradients reach every
    layer. The He init is used because the paper's N(0, 0.01) sits at chance for far longer on
    unit-variance inputs (see AlexNet's docstring)."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=2, width=0.25, dropout=0.0, init="kaiming")
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 2
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).all()
