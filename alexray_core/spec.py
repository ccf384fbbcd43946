"""The job spec: nested dataclasses, read from YAML, overridden by ``--set section.field=value``.

Precedence, lowest first: the defaults below, the YAML file, then each ``--set`` in order.
Unknown keys and bad values are refused with the dotted path of the field. This module imports
no torch, so the orchestrator can validate a spec on a laptop without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from alexray_core.errors import AlexrayError


class SpecError(AlexrayError):
    """A spec problem; the message starts with the dotted path of the bad field."""


@dataclass
class RunSpec:
    name: str | None = None  # run name; the run directory is {storage}/{name}. None: generated, unique
    storage: str = "./runs"  # where runs live: a local directory or s3://bucket/prefix (shared by all nodes)


@dataclass
class DataSpec:
    path: str = ""  # a directory written by 'alexray shard' (local or s3://)
    train_split: str = "train"  # split to train on
    val_split: str | None = "val"  # split to evaluate on every epoch; None: no evaluation
    streams: int = 8  # fixed partitions of each epoch; must divide the global batch (world-size independent)
    shuffle_block: int = 1000  # samples shuffled together within a stream (memory: this many raw JPEGs)
    num_workers: int = 2  # decoding threads per training worker (1 at least), and per evaluation
    # data.decode may change on resume (it is not in run_identity): both paths draw the same samples and crops.
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # JPEGs: cpu (data threads), gpu (nvJPEG), auto (gpu on CUDA)
    # gpu on a CPU-only worker runs the device path on the CPU (what the tests check); auto falls back to cpu
    # when the GPU decoder does not work, gpu then fails at set-up naming the problem.
    image_size: int = 224  # side of the square crops fed to the model
    min_crop_area: float = 0.08  # RandomResizedCrop's smallest crop, as a fraction of the image area
    eval_resize: int = 256  # short side before the centre crop at evaluation
    lighting_std: float = 0.1  # the paper's PCA colour augmentation (alpha std); 0 turns it off
    ten_crop: bool = False  # evaluate on 10 crops (corners, centre and flips), as in the paper
    max_skipped_fraction: float = 0.001  # corrupt share of a rank's epoch (or of val) above which the run fails
    verify_shards: bool = False  # check shards' sha256 against the manifest as they stream (a shard per stream in RAM)


@dataclass
class ModelSpec:
    name: str = "alexnet"  # alexnet (2012 paper), alexnet_tv (torchvision's) or a torchvision classifier
    width: float = 1.0  # channel multiplier for the AlexNets (0.25 for CPU tests and the demo)
    groups: bool = True  # the paper's 2-group convolutions in conv2/4/5 (alexnet only)
    dropout: float = 0.5  # dropout before FC6 and FC7 (alexnet, alexnet_tv)
    init: Literal["paper", "kaiming"] = "paper"  # alexnet weight init: paper (N(0, 0.01), biases 1) or kaiming
    num_classes: int | None = None  # None: the number of classes in the dataset's manifest


@dataclass
class TrainSpec:
    epochs: int = 90  # passes over the training split
    global_batch_size: int = 128  # samples per step over all workers; per-worker batch = this / workers
    lr: float = 0.01  # base learning rate
    lr_scaling: Literal["none", "linear"] = "none"  # none, or linear: lr * global_batch_size / base_batch_size
    base_batch_size: int = 128  # the batch size lr is given for, with lr_scaling: linear
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty on the weights
    schedule: Literal["step", "plateau", "cosine"] = "step"  # /10 every step_epochs, /10 when val top-1 stalls, cosine
    step_epochs: int = 30  # step schedule: epochs between divisions by 10
    plateau_patience: int = 2  # plateau schedule: epochs without improvement before dividing
    warmup_epochs: float = 0.0  # linear warm-up from lr/10 over this many epochs, before any schedule
    seed: int = 0  # seed of the data order, augmentation and initialisation
    deterministic: bool = False  # deterministic kernels: bitwise-reproducible runs on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto (on GPU), on or off
    compile: bool = False  # torch.compile the model
    grad_compression: Literal["none", "bf16"] = "none"  # none or bf16: DDP gradient all-reduce in bfloat16
    max_steps: int | None = None  # stop after this many steps in total (tests, smoke runs)
    log_every: int = 10  # report metrics every this many steps
    # dense TFLOP/s of one device at the run's precision, for model FLOP utilisation (MFU);
    # 0: looked up by GPU name in workers/flops.py (no MFU on CPU or an unknown GPU)
    peak_tflops: float = 0.0


@dataclass
class CheckpointSpec:
    every_steps: int = 500  # also checkpoint every this many steps (0: only at epoch ends)
    keep: int = 3  # checkpoints kept by Ray (the newest); the best model is kept apart
    async_upload: bool = True  # upload while training goes on


@dataclass
class ScalingSpec:
    num_workers: int | list[int] = 2  # training workers, or [min, max] for an elastic run
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per training worker, shared by its data.num_workers threads
    resize_interval_s: float = 60.0  # elastic runs: seconds between Ray's looks for room to grow the group


@dataclass
class FailureSpec:
    max_failures: int = 3  # worker-group restarts before the run fails
    max_preemptions: int = -1  # node preemptions recovered from, apart from max_failures (-1: no limit)
    preemption_check_steps: int = 10  # ask Ray this often (steps) whether a node is going; a notice checkpoints at once


@dataclass
class DebugSpec:
    sample_log: bool = False  # record the sample keys every rank trains on, per step (exactly-once checks)
    step_delay: float = 0.0  # seconds slept after each step (tests that kill a run mid-epoch)
    checkpoint_delay: float = 0.0  # seconds slept before a checkpoint is marked complete (crash tests)


@dataclass
class FinetuneSpec:
    # What a fresh run starts from (None: from scratch): an alexray checkpoint or run dir (local, s3://);
    # torchvision:NAME, torchvision's ImageNet weights for its model NAME (alexnet for model.name alexnet_tv)
    # from the hub cache, never downloaded; or a local .pth state dict of the model the spec builds.
    from_checkpoint: str | None = None
    freeze_features: bool = False  # keep the convolutional layers as loaded; only the classifier trains
    backbone_lr_mult: float = 1.0  # lr of the convolutional layers as a fraction of the schedule's (e.g. 0.1)


TORCHVISION_SOURCE = "torchvision:"
STATE_DICT_SUFFIX = ".pth"


def torchvision_source(source: str | None) -> str | None:
    """NAME of a ``torchvision:NAME`` source, else None."""
    if source and source.startswith(TORCHVISION_SOURCE):
        return source[len(TORCHVISION_SOURCE):].strip()
    return None


def is_state_dict_file(source: str | None) -> bool:
    """Whether a source names a bare ``.pth`` state dict rather than an alexray checkpoint."""
    return (bool(source) and torchvision_source(source) is None
            and source.rstrip("/").lower().endswith(STATE_DICT_SUFFIX))


def torchvision_model_name(torchvision_name: str) -> str:
    """alexray's model.name for a torchvision model: its own name, but alexnet_tv for torchvision's AlexNet
    (alexray's alexnet is the paper's network, whose layers differ)."""
    return "alexnet_tv" if torchvision_name == "alexnet" else torchvision_name


def _check_weights_source(spec: JobSpec) -> None:
    """A torchvision:NAME or .pth source suits the spec's model, as far as can be told without torch."""
    source, m = spec.finetune.from_checkpoint, spec.model
    field_ = f"finetune.from_checkpoint: {source}"
    name = torchvision_source(source)
    if name is None:
        if source.startswith("s3://"):
            raise SpecError(f"{field_}: a .pth state dict is read from a local path; copy it to the nodes "
                            "and give that path")
        if m.name == "alexnet":
            raise SpecError(f"{field_}: a .pth state dict holds a torchvision-built model, and the spec's "
                            "model.name alexnet is the paper's network, whose layers differ; set model.name: "
                            "alexnet_tv (torchvision's AlexNet), or start from an alexray checkpoint")
        return
    if not name:
        raise SpecError(f"{field_}: names no model; write torchvision:NAME, e.g. torchvision:alexnet")
    if name == "alexnet_tv":
        raise SpecError(f"{field_}: torchvision calls its AlexNet alexnet; write torchvision:alexnet")
    wanted = torchvision_model_name(name)
    if m.name != wanted:
        also = " (torchvision's AlexNet; alexnet is the paper's network, whose layers differ)" if name == "alexnet" \
            else ""
        raise SpecError(f"{field_}: these are torchvision's weights for its {name} but the spec builds {m.name}; "
                        f"set model.name: {wanted}{also}")
    if m.width != 1.0:
        raise SpecError(f"{field_}: torchvision's weights are for the full-width model but the spec has "
                        f"model.width {m.width}; set model.width: 1.0")


@dataclass
class JobSpec:
    run: RunSpec = field(default_factory=RunSpec)
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    failure: FailureSpec = field(default_factory=FailureSpec)
    debug: DebugSpec = field(default_factory=DebugSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def worker_range(self) -> tuple[int, int]:
        n = self.scaling.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])


MAX_SEED = 2 ** 32 - 1
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)
# Query parameters that carry a credential or a signature: presigned S3 and GCS URLs, Azure SAS
# tokens, API keys. Whoever holds such a URL holds the access it grants.
_SECRET_QUERY = re.compile(r"[?&;](x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                           r"x-goog-credential|awsaccesskeyid|signature|sig|access_token|auth_token|token|"
                           r"api_?key|password|secret)=", re.IGNORECASE)
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Every spec field whose value becomes a path component, with the longest value it may take:
# run.name is the run directory under run.storage; model.name starts a generated run name
# (new_run_name adds "-YYYYmmdd-HHMMSS-xxxxxx", 23 characters).
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PATH_COMPONENTS = {"run.name": 128, "model.name": 128 - 23}
_PATH_USES = {"run.name": "it names the run directory in run.storage",
              "model.name": "it starts the generated run name, the run directory in run.storage"}


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted for floats."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):  # X | None, int | list[int]
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(path, value, candidate)
            except SpecError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise SpecError(f"{path}: expected {' or '.join(_describe(c) for c in candidates)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            hint = " (YAML reads unquoted on/off/yes/no as true/false: quote it)" if isinstance(value, bool) else ""
            raise SpecError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, get_args(annotation)[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SpecError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled annotation {annotation} at {path}")


def _describe(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return f"one of {', '.join(map(str, get_args(annotation)))}"
    if get_origin(annotation) is list:
        return "a [min, max] list" if get_args(annotation)[0] is int else "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise SpecError(f"{prefix or 'spec'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"{where}: unknown key; {hint}known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, path)
        else:
            kwargs[name] = _coerce(path, value, annotation)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings (values parsed as YAML) on top of ``data``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected section.field=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"{key}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def _url_secret(text: str) -> str | None:
    """What secret a URL in ``text`` carries ("password", "token" or a query parameter), or None.

    Credentials are not always well-formed userinfo: an AWS secret key may hold '/' (so the
    password runs past the first '/'), and a bare token sits before '@' without any ':'. A
    ``host:port/path@x`` is told apart by its all-digit port.
    """
    for start in _URL_START.finditer(text):
        rest = re.split(r"\s", text[start.end():], maxsplit=1)[0]
        query = _SECRET_QUERY.search(rest)
        if query:
            return query.group(1)
        before, at, _ = rest.partition("@")
        if not at or not before:
            continue
        cut = min((i for i in (before.find(c) for c in "/?#") if i >= 0), default=len(before))
        if cut == len(before):  # plain userinfo: user:password@ or token@
            return "password" if ":" in before else "token"
        host, colon, after = before[:cut].partition(":")
        if colon and host and not (after.isdigit() and len(after) <= 5):
            return "password"  # user:pass/word@host
    return None


def _check_secrets(data: Any, path: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)):
                raise SpecError(f"{sub}: specs must not carry secrets (Ray shows job specs in plain text); "
                                "give the nodes credentials through their own AWS credential chain")
            _check_secrets(value, sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_secrets(value, f"{path}[{i}]")
    elif isinstance(data, str):
        found = _url_secret(data)
        if found in ("password", "token"):
            raise SpecError(f"{path}: a URL with an embedded {found}; specs must not carry secrets (Ray shows job "
                            "specs in plain text): remove it and use the nodes' own credentials")
        if found:
            raise SpecError(f"{path}: a presigned or token-carrying URL ({found} in its query); specs must not "
                            "carry secrets (Ray shows job specs in plain text): give s3://BUCKET/PREFIX and let "
                            "the nodes use their own credentials")


def _check_path_components(spec: JobSpec) -> None:
    """Refuse a value that would leave its directory ('..', '/') or break a file name, naming the field set."""
    for path, longest in _PATH_COMPONENTS.items():
        section, name = path.split(".")
        value = getattr(getattr(spec, section), name)
        if value is not None and (len(value) > longest or not _PATH_COMPONENT.fullmatch(value)):
            raise SpecError(f"{path}: {value!r} must be letters, digits, '_', '.', '-' (at most {longest}, starting "
                            f"with a letter or digit): {_PATH_USES[path]}")


def validate(spec: JobSpec) -> JobSpec:
    """Refuse impossible values, naming the field."""
    _check_path_components(spec)
    _check_training_values(spec)
    _check_workers(spec)
    _check_finetune(spec)
    return spec


def _check_training_values(spec: JobSpec) -> None:
    """Each number of train, data, model and checkpoint (and failure.max_failures) within its range."""
    t, d = spec.train, spec.data
    positive = {"train.epochs": t.epochs, "train.global_batch_size": t.global_batch_size,
                "train.base_batch_size": t.base_batch_size, "train.step_epochs": t.step_epochs,
                "train.log_every": t.log_every, "data.streams": d.streams, "data.shuffle_block": d.shuffle_block,
                "data.image_size": d.image_size, "data.eval_resize": d.eval_resize, "checkpoint.keep": spec.checkpoint.keep}
    for path, value in positive.items():
        if value < 1:
            raise SpecError(f"{path}: must be at least 1, got {value}")
    if t.lr <= 0:
        raise SpecError(f"train.lr: must be positive, got {t.lr}")
    if not 0 <= t.momentum < 1:
        raise SpecError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        raise SpecError(f"train.weight_decay: must not be negative, got {t.weight_decay}")
    if t.max_steps is not None and t.max_steps < 1:
        raise SpecError(f"train.max_steps: must be at least 1, got {t.max_steps}")
    if not t.peak_tflops >= 0:  # also refuses nan
        raise SpecError(f"train.peak_tflops: must not be negative (0: look the GPU up), got {t.peak_tflops}")
    if not 0 <= t.seed <= MAX_SEED:  # numpy's seeds are unsigned 32-bit; torch's are derived from it by x1000
        raise SpecError(f"train.seed: must be an integer between 0 and {MAX_SEED}, got {t.seed}")
    if d.num_workers < 0:
        raise SpecError(f"data.num_workers: must not be negative, got {d.num_workers}")
    if not 0 < d.min_crop_area <= 1:
        raise SpecError(f"data.min_crop_area: must be in (0, 1], got {d.min_crop_area}")
    if not 0 <= d.lighting_std <= 1:
        raise SpecError(f"data.lighting_std: must be in [0, 1], got {d.lighting_std}")
    if not 0 <= d.max_skipped_fraction <= 1:
        raise SpecError(f"data.max_skipped_fraction: must be in [0, 1], got {d.max_skipped_fraction}")
    smallest = {"alexnet": 64, "alexnet_tv": 64}.get(spec.model.name)  # below, the pooling shrinks maps to nothing
    if smallest and d.image_size < smallest:
        raise SpecError(f"data.image_size: {d.image_size} is too small for {spec.model.name}; use at least {smallest}")
    if d.eval_resize < d.image_size:
        raise SpecError(f"data.eval_resize: {d.eval_resize} is smaller than data.image_size {d.image_size}")
    if not d.path:
        raise SpecError("data.path: required; point it at a directory written by 'alexray shard'")
    if spec.checkpoint.every_steps < 0:
        raise SpecError(f"checkpoint.every_steps: must not be negative, got {spec.checkpoint.every_steps}")
    if spec.failure.max_failures < -1:
        raise SpecError(f"failure.max_failures: must be -1 (unlimited) or more, got {spec.failure.max_failures}")
    if not 0 < spec.model.width <= 4:
        raise SpecError(f"model.width: must be in (0, 4], got {spec.model.width}")
    if not 0 <= spec.model.dropout < 1:
        raise SpecError(f"model.dropout: must be in [0, 1), got {spec.model.dropout}")
    if spec.model.num_classes is not None and spec.model.num_classes < 2:
        raise SpecError(f"model.num_classes: must be at least 2, got {spec.model.num_classes}")


def _check_workers(spec: JobSpec) -> None:
    """The workers' range and resources, a batch every run size divides, preemption's settings."""
    t, d, s = spec.train, spec.data, spec.scaling
    if isinstance(s.num_workers, list):
        if len(s.num_workers) != 2 or not 1 <= s.num_workers[0] <= s.num_workers[1]:
            raise SpecError(f"scaling.num_workers: a range must be [min, max] with 1 <= min <= max, got {s.num_workers}")
    elif s.num_workers < 1:
        raise SpecError(f"scaling.num_workers: must be at least 1, got {s.num_workers}")
    if s.cpus_per_worker <= 0:
        raise SpecError(f"scaling.cpus_per_worker: must be positive, got {s.cpus_per_worker}")
    if t.global_batch_size % d.streams:
        raise SpecError(f"data.streams: {d.streams} must divide train.global_batch_size {t.global_batch_size}")
    lo, hi = spec.worker_range()
    for workers in range(lo, hi + 1):  # an elastic run may take any size in its range
        if t.global_batch_size % workers:
            raise SpecError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                            f"{workers} workers (scaling.num_workers); pick a multiple")
    if s.resize_interval_s <= 0:
        raise SpecError(f"scaling.resize_interval_s: must be positive, got {s.resize_interval_s}")
    if spec.failure.max_preemptions < -1:
        raise SpecError(f"failure.max_preemptions: must be -1 (unlimited) or more, got {spec.failure.max_preemptions}")
    if spec.failure.preemption_check_steps < 0:
        raise SpecError(f"failure.preemption_check_steps: must not be negative (0: never ask), "
                        f"got {spec.failure.preemption_check_steps}")


def _check_finetune(spec: JobSpec) -> None:
    """Fine-tuning's weights source suits the model, and its options come with a source."""
    f = spec.finetune
    if f.from_checkpoint is not None and not f.from_checkpoint.strip():
        raise SpecError("finetune.from_checkpoint: empty; give a checkpoint or run directory, torchvision:NAME, "
                        "a .pth file, or null for scratch")
    if f.from_checkpoint and (torchvision_source(f.from_checkpoint) is not None
                              or is_state_dict_file(f.from_checkpoint)):
        _check_weights_source(spec)
    if not 0 < f.backbone_lr_mult <= 10:
        raise SpecError(f"finetune.backbone_lr_mult: must be in (0, 10], got {f.backbone_lr_mult} "
                        "(to keep the layers fixed, set finetune.freeze_features: true)")
    if f.from_checkpoint is None and (f.freeze_features or f.backbone_lr_mult != 1.0):
        which = "freeze_features" if f.freeze_features else "backbone_lr_mult"
        raise SpecError(f"finetune.{which}: only applies with finetune.from_checkpoint "
                        "(alexray finetune SPEC.yaml --from CHECKPOINT)")


def load_spec(source: str | Path | dict | None, overrides: list[str] | None = None) -> JobSpec:
    """Read a spec (a YAML path, a mapping or None for defaults), apply overrides, validate it."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise SpecError(f"spec: {path} does not exist") from None
        except yaml.YAMLError as e:
            raise SpecError(f"spec: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError("spec: the top level must be a mapping of sections (run, data, model, train, ...)")
    data = apply_overrides(data, overrides or [])
    _check_secrets(data)
    return validate(_build(JobSpec, data, ""))


def run_identity(spec: JobSpec) -> dict:
    """Spec fields a resumed run must share with the run it continues (the rest may change on resume):
    those that decide the data order (a change would repeat some samples and skip others) and the
    weights' shapes (a checkpoint would not load, or would load into another network)."""
    d, m = spec.data, spec.model
    identity = {"data.path": d.path.rstrip("/"), "data.streams": d.streams, "data.shuffle_block": d.shuffle_block,
                "data.image_size": d.image_size, "train.global_batch_size": spec.train.global_batch_size,
                "train.seed": spec.train.seed, "model.name": m.name, "model.width": m.width,
                "model.num_classes": m.num_classes}
    if m.name == "alexnet":  # the only model these two build differently
        identity.update({"model.groups": m.groups, "model.init": m.init})
    return identity


def _identity_changes(theirs: dict, ours: dict) -> str:
    """``field old -> new`` for each field both record and that differs (older records hold fewer)."""
    return ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if k in theirs and theirs[k] != ours[k])


def planned_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """Steps the run takes in all: epochs x steps per epoch, capped by ``train.max_steps``."""
    total = steps_per_epoch * spec.train.epochs
    return min(total, spec.train.max_steps) if spec.train.max_steps else total


def new_run_name(model_name: str) -> str:
    """A unique, stable run name: ``alexnet-20261129-020609-194d6f``."""
    return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_same_job(existing: dict, spec: JobSpec) -> None:
    """Refuse ``spec`` under the name of an existing run (its ``spec.json``) that is another job.

    Reusing a name resumes that run from its newest checkpoint (Ray finds it by name and storage),
    so a different dataset, batch, seed or model under the same name is refused.
    """
    changed = _identity_changes(run_identity(spec_from_dict(existing)), run_identity(spec))
    if changed:
        raise SpecError(f"run.name: a run named {spec.run.name!r} already exists in {spec.run.storage} as a "
                        f"different job ({changed}); pick a new run.name, or leave it unset for a fresh one")


def check_resumed_identity(recorded: dict, spec: JobSpec) -> None:
    """Refuse to resume a checkpoint whose recorded identity (in its training state) is another job's."""
    changed = _identity_changes(recorded, run_identity(spec))
    if changed:
        raise SpecError(f"run.name: this run's checkpoint belongs to a different job ({changed}); put the fields "
                        "back, or use a new run.name for a different job")


def spec_from_dict(data: dict) -> JobSpec:
    """Rebuild a validated spec from ``JobSpec.to_dict()`` (as shipped to workers)."""
    return validate(_build(JobSpec, data, ""))
