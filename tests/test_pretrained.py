"""Fine-tuning from torchvision's ImageNet weights: ``torchvision:NAME`` and ``.pth`` sources.

No network: the "published" weights are a freshly built torchvision model's state dict, saved under
the file name torchvision publishes them as, in a torch hub cache under ``TORCH_HOME``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from alexray_core.spec import SpecError, load_spec
from tests.support.pickles import code_running_pickle
from tests.trainingtools import read_json, sharded_digits, write_spec

ALEXNET_URL = torchvision.models.get_model_weights("alexnet").DEFAULT.url
ALEXNET_FILE = os.path.basename(ALEXNET_URL)  # alexnet-owt-7be5be79.pth
RESNET18_FILE = os.path.basename(torchvision.models.get_model_weights("resnet18").DEFAULT.url)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds torchvision's AlexNet weights (made up: seeded, not trained)."""
    home = tmp_path_factory.mktemp("torch-home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(7)
    weights = torchvision.models.alexnet(weights=None).state_dict()
    path = home / "hub" / "checkpoints" / ALEXNET_FILE
    torch.save(weights, path)
    yield {"home": home, "path": path, "weights": weights}
    path.unlink()  # 233 MB: not left for the rest of the suite's /tmp


@pytest.fixture
def torch_home(hub, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(hub["home"]))
    return hub["home"]


def spec_with(source: str, *overrides: str, name: str = "alexnet_tv"):
    return load_spec(None, ["data.path=/data/shards", f"model.name={name}", "model.width=1.0",
                            f"finetune.from_checkpoint={json.dumps(source)}", *overrides])


def cli(capsys, *args) -> tuple[int, str]:
    """``alexray finetune ...`` in this process; returns the exit code and the one error line (or "")."""
    from workers.tools.cli import main

    code = main(["finetune", *map(str, args)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == (code != 0), errors
    return code, "".join(errors)


# ---- the backbone comes from the file --------------------------------------------------------------

@pytest.mark.parametrize("form", ["torchvision", "path"])
def test_the_backbone_starts_as_the_file_and_the_head_is_new(form, hub, torch_home):
    from workers.models.architectures import build_model, model_kwargs
    from workers.models.pretrained import (
        check_weights_source,
        load_backbone,
        param_groups,
    )

    source = "torchvision:alexnet" if form == "torchvision" else str(hub["path"])
    spec = spec_with(source, "finetune.backbone_lr_mult=0.1")
    assert check_weights_source(spec) == str(hub["path"])
    torch.manual_seed(0)
    model = build_model("alexnet_tv", 5, 1.0, **model_kwargs(spec))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    assert load_backbone(model, spec) == str(hub["path"])
    after = model.state_dict()
    assert set(after) == set(hub["weights"])
    for key, value in after.items():
        expected = fresh[key] if key.startswith("classifier.6.") else hub["weights"][key]
        assert torch.equal(value, expected), key
    assert after["classifier.6.weight"].shape == (5, 4096) and hub["weights"]["classifier.6.weight"].shape[0] == 1000
    groups = param_groups(model, spec)
    assert [g["lr_mult"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.features.parameters()}


def test_finetune_from_torchvision_alexnet_trains_a_new_head_on_frozen_features(hub, torch_home, capsys, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("ALEXRAY_METRICS", "0")  # no metrics endpoint left behind in the test process
    data = sharded_digits(tmp_path, train_per_class=4, val_per_class=2)
    spec = write_spec(tmp_path / "ft.yaml", str(data), str(tmp_path / "runs"),
                      model={"name": "alexnet_tv", "width": 1.0, "dropout": 0.0},
                      data={"num_workers": 0}, scaling={"num_workers": 1}, checkpoint={"every_steps": 0},
                      train={"epochs": 1, "max_steps": 2, "global_batch_size": 16})
    code, error = cli(capsys, spec, "--from", "torchvision:alexnet", "--freeze-features", "--set", "run.name=tv",
                      "--no-ray")
    assert code == 0, error
    run = tmp_path / "runs" / "tv"
    assert read_json(run / "spec.json")["finetune"]["from_checkpoint"] == "torchvision:alexnet"
    final = sorted((run / "checkpoints").iterdir())[-1]
    assert read_json(final / "state.json")["global_step"] == 2
    tuned = torch.load(final / "model.pt", weights_only=True)
    features = [k for k in hub["weights"] if k.startswith("features.")]
    assert features and all(torch.equal(tuned[k], hub["weights"][k]) for k in features)
    assert tuned["classifier.6.weight"].shape == (10, 4096)
    assert not torch.equal(tuned["classifier.1.weight"], hub["weights"]["classifier.1.weight"])  # FC6 trained
    shutil.rmtree(run)  # 650 MB of full-width checkpoints


# ---- refusals ----------------------------------------------------------------------------------------

def test_an_absent_file_names_its_url_and_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    spec = write_spec(tmp_path / "ft.yaml", "/data/shards", str(tmp_path / "runs"), model={"name": "alexnet_tv"})
    code, error = cli(capsys, spec, "--from", "torchvision:alexnet", "--set", "model.width=1.0", "--no-ray")
    cached = tmp_path / "empty-home" / "hub" / "checkpoints" / ALEXNET_FILE
    assert code == 2 and f"download {ALEXNET_URL} to {cached}" in error, error
    assert "or pass the file's path" in error

    code, error = cli(capsys, spec, "--from", tmp_path / ALEXNET_FILE, "--set", "model.width=1.0", "--no-ray")
    assert code == 2 and f"{tmp_path / ALEXNET_FILE} does not exist" in error and ALEXNET_URL in error, error
    assert not (tmp_path / "runs").exists()  # refused before any run was created


def test_weights_of_another_model_are_refused_naming_a_key_and_the_model(hub, tmp_path):
    from workers.models import checkpoint_format as ckpt
    from workers.models.pretrained import check_weights_source

    resnet = torchvision.models.resnet18(weights=None).state_dict()
    for name, fix in (("mine.pth", "pass weights saved from the spec's model (alexnet_tv, width 1.0)"),
                      (RESNET18_FILE, "they are torchvision's resnet18 weights: set model.name: resnet18")):
        torch.save(resnet, tmp_path / name)
        with pytest.raises(ckpt.CheckpointError) as e:
            check_weights_source(spec_with(str(tmp_path / name)))
        message = str(e.value)
        assert message.startswith(f"finetune.from_checkpoint: {tmp_path / name} does not fit the spec's alexnet_tv "
                                  "(it has no features.0.weight)") and fix in message, message

    # torchvision's AlexNet file for a narrow alexnet_tv: the shapes differ
    with pytest.raises(ckpt.CheckpointError, match=r"\(features.0.weight is \[64, 3, 11, 11\] there, \[16, 3, 11, 11\] "
                                                    r"in the model\); .*set model.width: 1.0$"):
        check_weights_source(spec_with(str(hub["path"]), "model.width=0.25"))
    # and the right model's own weights under another head size still fit: the head is not compared
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r3.pth")
    assert check_weights_source(spec_with(str(tmp_path / "r3.pth"), name="resnet18")) == str(tmp_path / "r3.pth")


def test_a_file_that_is_not_a_weights_only_state_dict_is_refused_without_running_it(tmp_path):
    from workers.models import checkpoint_format as ckpt
    from workers.models.pretrained import check_weights_source

    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(code_running_pickle(marker, protocol=2))
    with pytest.raises(ckpt.CheckpointError, match=r"evil.pth does not load as a state dict with weights_only=True "
                                                    r"\(UnpicklingError: .*\); save the weights alone"):
        check_weights_source(spec_with(str(tmp_path / "evil.pth")))
    assert not marker.exists()
    torch.save({"epoch": 3, "model": {}}, tmp_path / "wrapped.pth")
    with pytest.raises(ckpt.CheckpointError, match="wrapped.pth holds no state dict of tensors"):
        check_weights_source(spec_with(str(tmp_path / "wrapped.pth")))


def test_an_unknown_torchvision_model_is_named_with_the_closest(torch_home):
    from workers.models.pretrained import check_weights_source

    with pytest.raises(SpecError, match=r"torchvision has no classifier 'resnet181'; .* e.g. torchvision:resnet18$"):
        check_weights_source(spec_with("torchvision:resnet181", name="resnet181"))


def test_preflight_checks_a_pth_file_here_and_leaves_the_hub_cache_to_the_nodes(hub, tmp_path):
    from orchestrator.preflight import check_finetune_source
    from orchestrator.rayclient import JobError

    assert check_finetune_source(spec_with(str(hub["path"]))) == str(hub["path"])
    assert check_finetune_source(spec_with("torchvision:alexnet")) == "torchvision:alexnet"
    with pytest.raises(JobError, match=rf"^finetune.from_checkpoint: {re.escape(str(tmp_path))}/none.pth does not "
                                       "exist or is not a file; pass the path of a .pth state dict$"):
        check_finetune_source(spec_with(str(tmp_path / "none.pth")))
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(JobError, match="dir.pth does not exist or is not a file"):
        check_finetune_source(spec_with(str(tmp_path / "dir.pth")))
