"""The job spec (alexray_core.spec): what ``load_spec`` takes from a file, a dict and ``--set``
overrides, what it refuses and how (one line that starts with the field and says what to do), and what
a resume may not change (``check_same_job``). Nothing here needs torch, a cluster or storage: a spec is
checked where it is written, before anything starts."""

from __future__ import annotations

import copy
import json
import re

import pytest

from alexray_core.spec import SpecError, check_same_job, load_spec
from tests.shardtools import ROOT

DATA = {"data": {"path": "/data/shards"}}  # passed as a copy: load_spec writes overrides into a dict's sections


def _refusal(source, overrides: list[str]) -> str:
    """The message of the SpecError ``load_spec(source, overrides)`` raises; it is one line."""
    with pytest.raises(SpecError) as error:
        load_spec(copy.deepcopy(source), overrides)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---- values taken -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source, overrides, expected", [
    ({"data": {"path": "/data"}, "train": {"schedule": "cosine", "channels_last": "off"}, "model": {"init": "kaiming"}},
     [], {"train.schedule": "cosine", "train.channels_last": "off", "model.init": "kaiming"}),  # choices from YAML
    (DATA, [], {"data.decode": "auto", "train.peak_tflops": 0.0}),  # defaults
    (DATA, ["train.peak_tflops=989"], {"train.peak_tflops": 989.0}),
    (DATA, ["train.seed=0"], {"train.seed": 0}),  # the edge seeds
    (DATA, [f"train.seed={2 ** 32 - 1}"], {"train.seed": 2 ** 32 - 1}),
    (None, ["data.path=/data/shards", "model.name=resnet50", "run.name=my-run_1.a"],  # names fit for paths
     {"model.name": "resnet50", "run.name": "my-run_1.a"}),
])
def test_a_valid_value_is_taken(source, overrides, expected):
    spec = load_spec(copy.deepcopy(source), overrides)
    taken = {field: getattr(getattr(spec, field.split(".")[0]), field.split(".")[1]) for field in expected}
    assert taken == expected


@pytest.mark.parametrize("value", ["s3://bucket/prefix", "s3://bucket/user@example.com/shards",
                                   "http://10.0.0.5:9000/shards@v2", "/data/a@b/shards",
                                   "s3://bucket/shards?endpoint_override=http://127.0.0.1:9000"])
def test_urls_without_secrets_pass(value):
    assert load_spec(None, [f"data.path={json.dumps(value)}"]).data.path == value


def test_spec_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("data: {path: /data}\ntrain: {epochs: 5, lr: 0.02}\n")
    spec = load_spec(path, ["train.epochs=7", "scaling.num_workers=[2, 4]", "data.val_split=null",
                            "train.global_batch_size=96"])
    assert (spec.train.epochs, spec.train.lr, spec.scaling.num_workers, spec.data.val_split) == (7, 0.02, [2, 4], None)
    # an elastic run may take any size in its range: 128 does not divide by 3
    with pytest.raises(SpecError, match=r"^train.global_batch_size: 128 is not divisible by 3 workers"):
        load_spec(path, ["scaling.num_workers=[2, 4]"])
    with pytest.raises(SpecError, match=r"^data.image_size: 32 is too small for alexnet; use at least 64"):
        load_spec(path, ["data.image_size=32", "data.eval_resize=32"])
    assert spec.train.momentum == 0.9 and spec.train.weight_decay == 5e-4  # the paper's defaults


@pytest.mark.parametrize("name, workers, use_gpu, per_worker_batch, width, image_size", [
    ("digits.yaml", 2, False, 32, 0.25, 64),  # the demo (README): 2 CPU workers, AlexNet at width 0.25, 64 px
    ("imagenet-alexnet.yaml", 8, True, 128, 1.0, 224),  # the paper's AlexNet, 128 per GPU on 8 GPUs
])
def test_example_specs_load_as_the_docs_describe_them(name, workers, use_gpu, per_worker_batch, width, image_size):
    # with the overrides the README submits them with; a stale example raises here, naming the field
    spec = load_spec(ROOT / "examples" / name, ["data.path=s3://bucket/shards", "run.storage=s3://bucket/runs"])
    assert spec.worker_range() == (workers, workers) and spec.scaling.use_gpu is use_gpu
    assert spec.train.global_batch_size // workers == per_worker_batch
    assert (spec.model.name, spec.model.width, spec.data.image_size) == ("alexnet", width, image_size)


# ---- values refused ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, allowed", [
    ("train.schedule=linear", "train.schedule", "step, plateau, cosine"),
    ("train.precision=fp16", "train.precision", "auto, bf16, fp32"),
    ("train.channels_last=sometimes", "train.channels_last", "auto, on, off"),
    ("train.grad_compression=fp8", "train.grad_compression", "none, bf16"),
    ("train.lr_scaling=sqrt", "train.lr_scaling", "none, linear"),
    ("model.init=xavier", "model.init", "paper, kaiming"),
    ("data.decode=nvjpeg", "data.decode", "auto, cpu, gpu"),
])
def test_a_choice_field_refuses_a_value_naming_the_field_and_its_choices(override, field, allowed):
    value = override.partition("=")[2]
    assert _refusal({"data": {"path": "/data"}}, [override]) == f"{field}: {value!r} is not one of {allowed}"


def test_an_unquoted_yaml_off_is_refused_with_the_reason():
    with pytest.raises(SpecError, match=r"^train.channels_last: False is not one of auto, on, off \(YAML reads "
                                         r"unquoted on/off/yes/no as true/false: quote it\)$"):
        load_spec({"data": {"path": "/data"}}, ["train.channels_last=off"])


@pytest.mark.parametrize("override, message", [
    ("train.epocs=3", "train.epocs: unknown key; did you mean 'epochs'? known keys here: base_batch_size,"),
    ("trian.epochs=3", "trian: unknown key; did you mean 'train'? known keys here: checkpoint,"),
    ("train.zzz=3", "train.zzz: unknown key; known keys here: base_batch_size,"),
    ("finetune.from=x", "finetune.from: unknown key"),
])
def test_an_unknown_key_suggests_the_closest_known_one(override, message):
    refusal = _refusal({"data": {"path": "/data"}}, [override])
    assert refusal.startswith(message), refusal


@pytest.mark.parametrize("override, message", [
    ("scaling.num_workers=abc", "scaling.num_workers: expected an integer or a [min, max] list"),
    ("scaling.num_workers=[3,1]", "scaling.num_workers: a range must be [min, max]"),
    ("model.num_classes=1.5", "model.num_classes: expected an integer"),
    ("train.deterministic=yes please", "train.deterministic: expected true or false"),
    ("data.eval_resize=100", "data.eval_resize: 100 is smaller than data.image_size 224"),
    ("train.peak_tflops=-1", "train.peak_tflops: must not be negative"),
    ("train.peak_tflops=.nan", "train.peak_tflops: must not be negative"),
    ("aws.secret_access_key=x", "aws.secret_access_key: specs must not carry secrets"),
    ("nonsense", "--set 'nonsense': expected section.field=value"),
    ("finetune.freeze_features=true", "finetune.freeze_features: only applies with finetune.from_checkpoint"),
    ("finetune.backbone_lr_mult=0.1", "finetune.backbone_lr_mult: only applies with finetune.from_checkpoint"),
    ("finetune.from_checkpoint=''", "finetune.from_checkpoint: empty"),
])
def test_spec_validation_names_the_field(override, message):
    refusal = _refusal(DATA, [override])
    assert refusal.startswith(message), refusal


@pytest.mark.parametrize("seed", [-1, -(2 ** 40), 2 ** 32, 2 ** 70])
def test_out_of_range_seeds_are_refused_at_spec_load(seed):
    assert re.match(r"train.seed: .*between 0 and 4294967295", _refusal(DATA, [f"train.seed={seed}"]))


@pytest.mark.parametrize("override, field", [
    ("model.name=../../../tmp/x", "model.name"),
    ("model.name=a/b", "model.name"),
    ("model.name=.hidden", "model.name"),
    (f"model.name={'a' * 106}", "model.name"),  # with the generated suffix, over 128 characters
    ("run.name=../elsewhere", "run.name"),
    ("run.name=a b", "run.name"),
])
def test_a_path_component_field_is_refused_when_the_spec_is_loaded(override, field):
    message = _refusal(None, ["data.path=/data/shards", override])
    assert message.startswith(f"{field}: ") and "letters, digits" in message, message


@pytest.mark.parametrize("value, words", [
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/shards", "embedded password"),
    ("s3://user:pass@bucket/shards", "embedded password"),
    ("https://ghp_abcdefTOKEN123@example.com/shards", "embedded token"),
    ("https://bucket.s3.amazonaws.com/shards?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
     "&X-Amz-Signature=abcdef", "presigned or token-carrying URL (X-Amz-Credential"),
    ("https://bucket.s3.amazonaws.com/shards?x-amz-signature=abcdef", "presigned or token-carrying URL"),
    ("https://account.blob.core.windows.net/shards?sv=2024&sig=abcdef", "presigned or token-carrying URL (sig"),
])
def test_secrets_in_urls_are_refused_without_echoing_them(value, words):
    for override in (f"data.path={json.dumps(value)}", f"finetune.from_checkpoint={json.dumps(value)}"):
        message = _refusal(None, ["data.path=/data/shards", override])
        field = override.split("=", 1)[0]
        assert message.startswith(f"{field}: ") and words in message, message
        secret = re.search(r"(?<=://)[^@]+(?=@)|(?<=Signature=)\w+|(?<=sig=)\w+|(?<=signature=)\w+", value)
        assert secret.group(0) not in message, message


@pytest.mark.parametrize("source, overrides, message", [
    ("torchvision:alexnet", ["model.name=alexnet"], "the spec builds alexnet; set model.name: alexnet_tv "
                                                    "(torchvision's AlexNet; alexnet is the paper's network"),
    ("torchvision:alexnet", ["model.name=resnet18"], "weights for its alexnet but the spec builds resnet18; "
                                                     "set model.name: alexnet_tv"),
    ("torchvision:resnet18", [], "weights for its resnet18 but the spec builds alexnet_tv; set model.name: resnet18"),
    ("torchvision:alexnet", ["model.width=0.25"], "model.width 0.25; set model.width: 1.0"),
    ("torchvision:", [], "names no model; write torchvision:NAME"),
    ("torchvision:alexnet_tv", [], "write torchvision:alexnet"),
    ("/w/alexnet-owt-7be5be79.pth", ["model.name=alexnet"], "set model.name: alexnet_tv (torchvision's AlexNet), or "
                                                            "start from an alexray checkpoint"),
    ("s3://bucket/w.pth", [], "a .pth state dict is read from a local path"),
])
def test_the_spec_refuses_weights_for_another_model(source, overrides, message):
    """Found without torch, so ``submit`` refuses them on a machine without it as well."""
    refusal = _refusal(None, ["data.path=/data/shards", "model.name=alexnet_tv", "model.width=1.0",
                              f"finetune.from_checkpoint={json.dumps(source)}", *overrides])
    assert refusal.startswith(f"finetune.from_checkpoint: {source}: ") and message in refusal, refusal


# ---- what a resume may not change -------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("data.shuffle_block=32", "data.shuffle_block"),
    ("data.image_size=96", "data.image_size"),
    ("model.groups=false", "model.groups"),
    ("model.num_classes=12", "model.num_classes"),
    ("model.init=paper", "model.init"),
    ("data.streams=4", "data.streams"),
])
def test_resume_refuses_changes_to_data_order_or_weight_shapes(override, field):
    base = {"data": {"path": "/data/shards", "shuffle_block": 64, "image_size": 64, "eval_resize": 128},
            "model": {"init": "kaiming"}, "run": {"name": "r"}}
    existing = load_spec(base).to_dict()
    check_same_job(existing, load_spec(base, ["train.epochs=5", "data.num_workers=4"]))  # may change
    with pytest.raises(SpecError, match=rf"^run.name: .*\({field} "):
        check_same_job(existing, load_spec(base, [override]))


def test_init_and_groups_only_count_for_the_model_they_apply_to():
    base = {"data": {"path": "/data/shards"}, "model": {"name": "resnet18"}}
    check_same_job(load_spec(base).to_dict(), load_spec(base, ["model.init=kaiming", "model.groups=false"]))
