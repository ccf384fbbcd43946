"""workers.models.architectures: the paper AlexNet, torchvision's AlexNet, the registry and the classifier
head; every torchvision classifier trained or refused at its image size before any worker starts
(workers.models.input_size), and the auxiliary classifiers of GoogLeNet and Inception v3 in the loss."""

import functools
import json
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

from alexray_core.spec import SpecError
from tests.shardtools import error_line
from workers.models.architectures import (
    AlexNet,
    AlexNetTV,
    alexnet_tv,
    build_model,
    build_model_on_meta,
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


# ---- every torchvision classifier: trained, or refused before any worker starts --------------------

TORCHVISION_CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# What the check refuses (torchvision 0.29): the start of what it says after "model.name: NAME ".
REFUSED = {
    ("inception_v3", 64): "needs data.image_size at least 299 (got 64): its auxiliary classifier, which runs "
                          "in training, takes no smaller input",
    ("inception_v3", 224): "needs data.image_size at least 299 (got 224): its auxiliary classifier, which runs "
                           "in training, takes no smaller input",
    ("maxvit_t", 64): "needs data.image_size 224 (got 64): torchvision builds it for 224 px inputs",
    **{(vit, 64): "needs data.image_size 224 (got 64): torchvision builds it for 224 px inputs (Wrong image height! "
       "Expected 224 but got 64!)" for vit in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}


@functools.cache
def _on_meta(name: str) -> nn.Module:
    return build_model_on_meta(name, 1000)


# At 224 px the passes take as long again (about 30 s on 2 cores): in make test, not make test-fast.
@pytest.mark.parametrize("size", [64, pytest.param(224, marks=pytest.mark.heavy("every torchvision model's "
                                                                                 "meta forward at 224 px"))])
@pytest.mark.parametrize("name", TORCHVISION_CLASSIFIERS)
def test_every_torchvision_classifier_is_taken_or_refused_in_one_line(name, size, monkeypatch):
    """The check before any worker starts, on the meta device (each model built once for both sizes)."""
    from alexray_core.spec import load_spec
    from workers.models import input_size

    monkeypatch.setattr(input_size, "build_model_on_meta", lambda name, *args, **kwargs: _on_meta(name))
    spec = load_spec(None, ["data.path=/data/shards", f"model.name={name}", f"data.image_size={size}"])
    expected = REFUSED.get((name, size))
    if expected is None:
        input_size.check_image_size(spec)
        return
    with pytest.raises(SpecError) as refused:
        input_size.check_image_size(spec)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"model.name: {name} {expected}"), message


def test_the_check_says_what_it_cannot_tell_and_passes_what_meta_cannot_run():
    from workers.models.input_size import image_size_problem

    class Odd(nn.Module):
        def __init__(self, error: Exception):
            super().__init__()
            self.conv, self.error = nn.Conv2d(3, 4, 3, device="meta"), error

        def forward(self, x):
            raise self.error

    assert image_size_problem(Odd(ValueError("no such input\nmore")), 64) == "cannot take data.image_size 64 (no such input)"
    # the meta device cannot run it: the workers' FLOP count runs on real tensors and finds out there
    assert image_size_problem(Odd(RuntimeError("Tensor.item() cannot be called on meta tensors")), 64) is None
    # GoogLeNet takes 15 px and more; RegNet (whose constructor reads tensors back) builds on meta too
    assert image_size_problem(build_model_on_meta("googlenet", 10), 15) is None
    assert image_size_problem(build_model_on_meta("googlenet", 10), 14).startswith("needs data.image_size at least 15")
    regnet = build_model_on_meta("regnet_x_400mf", 10)
    assert all(p.is_meta for p in regnet.parameters()) and image_size_problem(regnet, 64) is None
    torch.manual_seed(0)
    assert {k: v.shape for k, v in regnet.state_dict().items()} == \
        {k: v.shape for k, v in build_model("regnet_x_400mf", 10).state_dict().items()}


def test_googlenet_and_inception_build_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's notice that their default initialisation will change
        for name in ("googlenet", "inception_v3"):
            model = build_model_on_meta(name, 10)
            assert model.aux_logits and not model.transform_input


# ---- auxiliary classifiers: in the training loss, never in evaluation ------------------------------

SMALLEST = {"googlenet": 15, "inception_v3": 299}  # the smallest data.image_size each trains on


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_a_training_step_adds_the_auxiliary_losses_and_evaluation_sees_the_main_logits(name):
    """workers.training.loop._step on one batch against the loss by hand: main + 0.4 x each auxiliary."""
    from types import SimpleNamespace

    from torch.nn.functional import cross_entropy

    from workers.data.transforms import to_model_input
    from workers.models.architectures import class_probabilities
    from workers.models.evaluation import eval_mode
    from workers.training.loop import _step

    size = SMALLEST[name]
    torch.manual_seed(0)
    model = build_model(name, 3)
    outputs = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    run = SimpleNamespace(session=SimpleNamespace(device=torch.device("cpu")),
                          spec=SimpleNamespace(data=SimpleNamespace(lighting_std=0.0)), channels_last=False,
                          use_bf16=False, train_model=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    loss = _step(run, SimpleNamespace(labels=labels, images=images, alphas=None), True,
                 SimpleNamespace(maybe_publish=lambda: None))
    main, *aux = (o.detach() for o in outputs.pop())  # what the step's forward pass returned
    assert len(aux) == {"googlenet": 2, "inception_v3": 1}[name] and all(a.shape == (2, 3) for a in aux)
    main_loss = cross_entropy(main, labels)
    torch.testing.assert_close(loss.detach(), main_loss + 0.4 * sum(cross_entropy(a, labels) for a in aux))
    assert abs(loss.item() - main_loss.item()) > 0.1  # the auxiliary terms are there
    assert all(p.grad is not None for p in model.parameters())  # every head learns
    with eval_mode(model):  # evaluation, predict and export run the model in eval mode: one tensor
        assert class_probabilities(model, images).shape == (2, 3)
        assert isinstance(model(to_model_input(images, None, False)), torch.Tensor)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from tests.trainingtools import sharded_digits

    return sharded_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.heavy("two CPU training runs, of GoogLeNet and of Inception v3 at 299 px")
@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_models_with_auxiliary_classifiers_train_at_the_smallest_size_they_take(name, digits, tmp_path):
    from tests.shardtools import run_alexray
    from tests.trainingtools import read_json, write_spec

    size = SMALLEST[name]
    spec = write_spec(tmp_path / "spec.yaml", str(digits), str(tmp_path / "runs"),
                      model={"name": name, "width": 1.0}, data={"image_size": size, "eval_resize": size, "streams": 2},
                      train={"max_steps": 2, "global_batch_size": 2}, scaling={"num_workers": 1})
    proc = run_alexray("train", spec, "--no-ray", "--set", "run.name=aux")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(tmp_path / "runs" / "aux" / "summary.json")["steps"] == 2
    assert math.isfinite(read_json(tmp_path / "runs" / "aux" / "progress.json")["loss"])
    smaller = run_alexray("train", spec, "--no-ray", "--set", f"data.image_size={size - 1}")
    assert smaller.returncode == 2 and f"needs data.image_size at least {size} (got {size - 1})" in error_line(smaller)


def test_a_model_refused_at_its_size_exits_2_in_one_line_before_anything_starts(tmp_path):
    """On Ray as a submitted job's driver runs it (RAY_ADDRESS set; a cluster that is not there): no
    traceback, no run directory, no Ray connection, and no dataset needed to find it out."""
    from tests.shardtools import run_alexray
    from tests.trainingtools import write_spec

    spec = write_spec(tmp_path / "spec.yaml", str(tmp_path / "no-dataset"), str(tmp_path / "runs"),
                      model={"name": "vit_b_16", "width": 1.0}, scaling={"num_workers": 1})
    proc = run_alexray("train", spec, env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc) == ("alexray train: error: model.name: vit_b_16 needs data.image_size 224 (got 64): "
                                "torchvision builds it for 224 px inputs (Wrong image height! Expected 224 but got 64!)")
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert not (tmp_path / "runs").exists()
