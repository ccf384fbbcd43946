"""alexray evaluate / predict / finetune / export on a narrow AlexNet trained on real handwritten digits.

A model is pre-trained once on digits 0-4; fine-tuning moves it to digits 5-9. Training runs in one
process without Ray (``--no-ray``); the Ray and S3 paths of evaluate and predict run against the
session's real Ray cluster and SeaweedFS server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.shardtools import error_line, run_alexray
from tests.support import datasets as ds
from tests.support.pickles import code_running_pickle
from tests.trainingtools import read_json, write_spec
from workers.models import checkpoint_format as ckpt

pytestmark = pytest.mark.heavy("trains the models it evaluates, exports and fine-tunes (about 2 min)")

FAST = {"data": {"num_workers": 0}, "scaling": {"num_workers": 1}, "checkpoint": {"every_steps": 0}}


def shard_digits(root: Path, name: str, classes, train: int, val: int) -> Path:
    ds.write_digits_dataset(root / name, train_per_class=train, val_per_class=val, classes=classes)
    dest = root / f"{name}-shards"
    splits = "train,val" if train else "val"
    run_alexray("shard", root / name, dest, "--shard-size", 50, "--splits", splits, "--no-progress", check=True)
    return dest


def spec_for(path: Path, data: Path, storage: Path, **sections) -> Path:
    merged = {k: dict(v) for k, v in FAST.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_spec(path, str(data), str(storage), **merged)


def train(*args, command: str = "train") -> dict:
    proc = run_alexray(command, *args, "--no-ray", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def cli(capsys, *args) -> tuple[int, str, str]:
    """``alexray COMMAND ...`` in this process (torch is already imported: no start-up cost)."""
    from workers.tools.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model-tools")
    return {"root": root,
            "a_src": root / "a",
            "a": shard_digits(root, "a", range(5), train=100, val=30),  # pre-training: digits 0-4
            "b": shard_digits(root, "b", range(5, 10), train=30, val=30),  # fine-tuning: digits 5-9, little data
            "c": shard_digits(root, "c", range(4), train=0, val=3)}  # another class count


@pytest.fixture(scope="module")
def pretrained(digits) -> Path:
    """Run directory of a narrow AlexNet trained on digits 0-4 (about 96% val top-1)."""
    runs = digits["root"] / "runs"
    spec = spec_for(digits["root"] / "pre.yaml", digits["a"], runs, run={"name": "pre"},
                    train={"epochs": 6, "deterministic": True})
    summary = train(spec)
    assert summary["top1"] > 0.85, summary  # chance is 0.2
    return runs / "pre"


# ---- evaluate and predict -------------------------------------------------------------------------

def test_evaluate_counts_exactly_and_agrees_with_training_and_predict(pretrained, digits, capsys, tmp_path):
    report_path = tmp_path / "eval.json"
    code, out, err = cli(capsys, "evaluate", pretrained, "--num-workers", 0, "--no-progress", "--report", report_path)
    assert code == 0, err
    report = read_json(report_path)
    assert report["checkpoint"] == str(pretrained / "best")  # a run directory means its best model
    assert report["data"] == str(digits["a"])  # the run's own dataset when --data is not given
    assert (report["samples"], report["split_samples"], report["skipped"]) == (150, 150, 0)
    # the same number the training loop measured for best/, from an independent code path
    assert report["top1"] == read_json(pretrained / "best" / "metrics.json")["val_top1"]
    per_class = report["per_class"]
    assert [c["samples"] for c in per_class] == [30] * 5
    assert sum(c["correct_top1"] for c in per_class) == report["correct_top1"] == round(report["top1"] * 150)
    assert report["correct_top5"] == 150  # 5 classes: the top 5 always holds the answer
    worst = [c["top1"] for c in report["worst_classes"]]
    assert worst == sorted(worst) and len(worst) == 5
    for c in per_class:
        assert sum(x["count"] for x in c["confused_with"]) <= 30 - c["correct_top1"]
    assert f"top-1 {report['top1']:.4f} ({report['correct_top1']}/150)" in out

    code, out, err = cli(capsys, "evaluate", pretrained / "best", "--data", digits["a"], "--ten-crop",
                         "--num-workers", 0, "--no-progress", "--json")
    ten = json.loads(out)
    assert code == 0 and ten["ten_crop"] and ten["samples"] == 150 and ten["top1"] > 0.8

    # predict sees the val images as files, decoded by another library: the same answers
    code, out, err = cli(capsys, "predict", pretrained, digits["a_src"] / "val", "--json", "--no-progress")
    assert code == 0, err
    answers = json.loads(out)
    assert len(answers) == 150
    correct = [0] * 5
    for answer in answers:
        probabilities = [t["probability"] for t in answer["top"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        truth = Path(answer["input"]).parent.name
        correct[int(truth)] += answer["top"][0]["name"] == truth
    assert correct == [c["correct_top1"] for c in per_class]


def _confident_digit(pretrained, digits, capsys) -> tuple[Path, str]:
    """A val image the model classifies with at least 90% probability, and its class."""
    code, out, _ = cli(capsys, "predict", pretrained, digits["a_src"] / "val", "--json", "--no-progress")
    for answer in json.loads(out):
        if answer["top"][0]["probability"] > 0.9 and answer["top"][0]["name"] == Path(answer["input"]).parent.name:
            return Path(answer["input"]), answer["top"][0]["name"]
    raise AssertionError("no confidently classified digit")


def test_predict_reads_awkward_formats_and_reports_each_unreadable_file(pretrained, digits, capsys, tmp_path):
    source, label = _confident_digit(pretrained, digits, capsys)
    upright = Image.open(source).convert("RGB")
    folder = tmp_path / "inbox"
    folder.mkdir()
    upright.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    upright.convert("L").save(folder / "gray.png")
    rgba = upright.convert("RGBA")
    rgba.save(folder / "rgba-named.JPEG", format="PNG")  # a PNG under a JPEG name
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored on its side, shown upright
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", quality=95, exif=exif)
    ds.write_truncated_jpeg(folder / "truncated.jpg")
    ds.write_text_file(folder / "notes.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.jpg").write_bytes(b"ignored")

    code, out, err = cli(capsys, "predict", pretrained, folder, source, tmp_path / "missing.jpg", "--json",
                         "--no-progress")
    assert code == 2
    answers = {Path(a["input"]).name: a for a in json.loads(out)}
    assert ".hidden.jpg" not in answers
    for name in ("cmyk.jpg", "gray.png", "rgba-named.JPEG", "rotated.jpg", source.name):
        assert answers[name]["top"][0]["name"] == label, (name, answers[name])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 4, err
    reasons = {"truncated.jpg": "truncated", "notes.jpg": "not an image", "empty.jpg": "empty file",
               "missing.jpg": "does not exist"}
    for name, reason in reasons.items():
        line = next(line for line in errors if name in line)
        assert reason in line, line
        assert "error" in answers[name] and "top" not in answers[name]
    assert "5 of 9 images classified" in err


# ---- bad checkpoints and mismatched data ----------------------------------------------------------

def _copy_checkpoint(pretrained: Path, target: Path) -> Path:
    shutil.copytree(pretrained / "best", target)
    return target


def _reseal(directory: Path) -> None:
    """Rewrite complete.json to match the files as they are now (a forged but consistent checkpoint)."""
    files = {}
    for name in ("model.pt", "optimizer.pt", "state.json", "rng-rank0.pt"):
        data = (directory / name).read_bytes()
        files[name] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    (directory / ckpt.COMPLETE).write_text(json.dumps({"format_version": 1, "files": files}))


def test_bad_checkpoints_are_refused_with_one_line_and_no_pickle_runs(pretrained, digits, capsys, tmp_path):
    from workers.models.architectures import build_model

    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nothing", "does not exist")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases["a plain file"] = (tmp_path / "notes.txt", "is a file, not a checkpoint")
    (tmp_path / "empty-run").mkdir()
    cases["a directory without checkpoints"] = (tmp_path / "empty-run", "holds no checkpoint")
    truncated = _copy_checkpoint(pretrained, tmp_path / "truncated")
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 3])
    cases["truncated weights"] = (truncated, "truncated or damaged")
    partial = _copy_checkpoint(pretrained, tmp_path / "partial")
    (partial / ckpt.COMPLETE).unlink()
    cases["no complete.json"] = (partial, "not a complete checkpoint")

    other = _copy_checkpoint(pretrained, tmp_path / "other-model")
    torch.save(build_model("alexnet_tv", 5, 0.25).state_dict(), other / "model.pt")
    _reseal(other)
    cases["another model's weights"] = (other, "does not fit the alexnet (width 0.25, 5 classes)")

    marker = tmp_path / "pwned"
    evil = _copy_checkpoint(pretrained, tmp_path / "evil")
    (evil / "model.pt").write_bytes(code_running_pickle(marker, protocol=2))
    _reseal(evil)
    cases["a pickle that runs code"] = (evil, "not a loadable checkpoint file")

    for what, (path, message) in cases.items():
        for command in (("evaluate", path, "--data", digits["a"]), ("predict", path, digits["a_src"] / "val" / "0"),
                        ("export", path, "-o", tmp_path / "x.pt")):
            code, _, err = cli(capsys, *command, "--no-progress")
            assert code == 2, (what, command[0], err)
            assert message in one_error(err), (what, command[0], err)
    assert not marker.exists()
    assert not (tmp_path / "x.pt").exists()

    # a run directory whose newest checkpoint is damaged falls back to a complete one
    run = tmp_path / "run"
    shutil.copytree(pretrained / "checkpoints", run / "checkpoints")
    newest = sorted((run / "checkpoints").iterdir())[-1]
    (newest / ckpt.COMPLETE).unlink()
    code, out, err = cli(capsys, "evaluate", run, "--data", digits["a"], "--num-workers", 0, "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(sorted((run / "checkpoints").iterdir())[-2])


def test_data_with_other_classes_needs_finetune(pretrained, digits, capsys, tmp_path):
    code, _, err = cli(capsys, "evaluate", pretrained, "--data", digits["c"], "--no-progress")
    assert code == 2 and "has 4 classes but the checkpoint classifies 5; fine-tune it" in one_error(err)
    code, _, err = cli(capsys, "evaluate", pretrained, "--data", digits["b"], "--no-progress")
    assert code == 2 and "classes differ from the checkpoint's (class 0 is '5' there, '0'" in one_error(err)
    code, _, err = cli(capsys, "export", pretrained, "--data", digits["b"], "-o", tmp_path / "m.pt", "--no-progress")
    assert code == 2 and "classes differ" in one_error(err)

    spec = spec_for(tmp_path / "ft.yaml", digits["b"], tmp_path / "runs")
    code, _, err = cli(capsys, "finetune", spec, "--from", pretrained, "--set", "model.width=0.5", "--no-ray")
    assert code == 2
    assert "finetune.from_checkpoint" in one_error(err) and "set model.name: alexnet, model.width: 0.25" in err
    code, _, err = cli(capsys, "finetune", spec, "--from", tmp_path / "nothing", "--no-ray")
    assert code == 2 and "does not exist" in one_error(err)
    code, _, err = cli(capsys, "finetune", spec, "--from", pretrained, "--backbone-lr-mult", "0", "--no-ray")
    assert code == 2 and "finetune.backbone_lr_mult: must be in (0, 10]" in one_error(err)
    assert not (tmp_path / "runs").exists()  # refused before any run was created


# ---- fine-tuning ------------------------------------------------------------------------------------

def test_finetuning_beats_training_from_scratch_and_resumes(pretrained, digits, tmp_path):
    """Digits 5-9 with 30 images per class, 16 steps: the backbone learnt on digits 0-4 carries over."""
    runs = tmp_path / "runs"
    spec = spec_for(tmp_path / "b.yaml", digits["b"], runs, train={"epochs": 4, "deterministic": True})
    # interrupted after 6 steps, then resumed by name: the optimizer's parameter groups come back
    first = train(spec, "--from", pretrained, "--backbone-lr-mult", "0.1", "--set", "run.name=ft",
                  "--set", "train.max_steps=6", command="finetune")
    assert first["steps"] == 6
    finetuned = train(spec, "--from", pretrained, "--backbone-lr-mult", "0.1", "--set", "run.name=ft",
                      command="finetune")
    scratch = train(spec, "--set", "run.name=scratch")
    print(f"\nval top-1 on digits 5-9 after {scratch['steps']} steps: fine-tuned {finetuned['top1']:.3f}, "
          f"from scratch {scratch['top1']:.3f}")
    assert finetuned["steps"] == scratch["steps"] == 16 and finetuned["restarts"] == 1
    assert finetuned["top1"] >= scratch["top1"] + 0.15, (finetuned["top1"], scratch["top1"])
    state = read_json(runs / "ft" / "best" / "state.json")
    assert state["model"]["classes"] == ["5", "6", "7", "8", "9"] and state["model"]["num_classes"] == 5
    assert read_json(runs / "ft" / "spec.json")["finetune"] == {
        "from_checkpoint": str(pretrained), "freeze_features": False, "backbone_lr_mult": 0.1}
    final = sorted((runs / "ft" / "checkpoints").iterdir())[-1]
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert [g["lr_mult"] for g in optimizer["param_groups"]] == [0.1, 1.0]
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.1 * optimizer["param_groups"][1]["lr"])


def test_frozen_features_stay_as_loaded(pretrained, digits, tmp_path, monkeypatch):
    from alexray_core.spec import load_spec
    from workers.training.driver import prepare_run
    from workers.training.loop import run_local

    spec_path = spec_for(tmp_path / "b.yaml", digits["b"], tmp_path / "runs", train={"epochs": 1})
    spec = load_spec(spec_path, [f"finetune.from_checkpoint={json.dumps(str(pretrained))}",
                                 "finetune.freeze_features=true", "run.name=frozen"])
    monkeypatch.setenv("ALEXRAY_METRICS", "0")  # no metrics endpoint left behind in the test process
    summary = run_local(spec, prepare_run(spec))
    assert summary["steps"] == 4
    source = torch.load(pretrained / "best" / "model.pt", weights_only=True)
    final = sorted((tmp_path / "runs" / "frozen" / "checkpoints").iterdir())[-1]
    tuned = torch.load(final / "model.pt", weights_only=True)
    features = [k for k in source if k.startswith("features.")]
    assert features and all(torch.equal(source[k], tuned[k]) for k in features)
    assert not torch.equal(source["classifier.1.weight"], tuned["classifier.1.weight"])  # FC6 trains
    assert tuned["classifier.6.weight"].shape[0] == 5
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert len(optimizer["param_groups"]) == 1  # the frozen layers are not in the optimizer at all
    assert len(optimizer["param_groups"][0]["params"]) == 6  # FC6, FC7, FC8 weights and biases


# ---- export -----------------------------------------------------------------------------------------

FRESH = r"""
import importlib.abc, json, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("workers", "data_prep", "orchestrator", "tests", "bench"):
            raise ImportError(f"the exported model needed {name}")
        return None

sys.meta_path.insert(0, NoProject())
import numpy as np

fmt, model, images, out = sys.argv[1:5]
x = np.load(images)
if fmt == "torchscript":
    import torch
    extra = {"alexray.json": ""}
    module = torch.jit.load(model, _extra_files=extra)
    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy()
    meta = json.loads(extra["alexray.json"])
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    y = session.run(None, {"images": x})[0]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["alexray.json"])
    assert "torch" not in sys.modules, "onnxruntime alone must run the file"
np.save(out, y)
print(json.dumps(meta))
"""


@pytest.mark.parametrize("fmt, suffix", [("torchscript", "pt"), ("onnx", "onnx")])
def test_export_matches_pytorch_runs_without_the_project_and_int8_is_smaller(fmt, suffix, pretrained, digits,
                                                                             capsys, tmp_path):
    from workers.models.loading import load_checkpoint
    from workers.tools.export import ExportedClassifier

    model_file = tmp_path / f"digits.{suffix}"
    code, out, err = cli(capsys, "export", pretrained, "--format", fmt, "-o", model_file, "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    exported = report["exported"]
    assert exported["bytes"] == model_file.stat().st_size and report["compared_on"].startswith("150 samples")
    assert exported["max_abs_logit_diff_vs_pytorch"] < 1e-4
    assert exported["top1"] == report["pytorch_top1"] > 0.85 and report["top1_change"] == 0
    assert exported["latency_ms_per_image"] > 0

    # the file alone, in a fresh interpreter that cannot import this project
    images = np.random.default_rng(0).integers(0, 256, size=(7, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, fmt, str(model_file), str(tmp_path / "images.npy"),
                           str(tmp_path / "logits.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["classes"] == ["0", "1", "2", "3", "4"] and meta["image_size"] == 64
    with torch.no_grad():
        expected = ExportedClassifier(load_checkpoint(str(pretrained)).model).eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-4, atol=1e-4)

    code, out, err = cli(capsys, "export", pretrained, "--format", fmt, "--quantize", "int8", "-o",
                         tmp_path / f"digits-int8.{suffix}", "--json", "--no-progress")
    assert code == 0, err
    q = json.loads(out)
    print(f"\n{fmt}: float {q['float']['bytes']:,} B {q['float']['latency_ms_per_image']} ms, "
          f"int8 {q['exported']['bytes']:,} B {q['exported']['latency_ms_per_image']} ms, "
          f"top-1 {q['float']['top1']:.3f} -> {q['exported']['top1']:.3f}")
    assert q["float"]["bytes"] == pytest.approx(exported["bytes"], rel=0.01)
    # width 0.25 keeps 85% of its weights in the FC layers (96% at full width): at least 3x smaller
    assert q["size_ratio_float_to_int8"] > 3.0
    assert q["top1_change"] == pytest.approx(q["exported"]["top1"] - q["float"]["top1"])
    assert q["top1_change"] >= -0.03  # the quantised model's top-1 drop on the val split, bounded
    assert 0 < q["exported"]["max_abs_logit_diff_vs_pytorch"] < 1.0


# ---- Ray and S3 -------------------------------------------------------------------------------------

def test_evaluate_on_ray_reads_s3_and_counts_exactly(pretrained, digits, tmp_path, ray_cluster, s3_server,
                                                     s3_bucket, s3_env):
    _, env = ray_cluster
    run_alexray("shard", digits["a_src"], f"s3://{s3_bucket}/a", "--splits", "val", "--shard-size", 50,
                "--no-progress", env=s3_env, check=True)
    client = s3_server.client()
    for path in (pretrained / "best").iterdir():  # a run on S3 with only its best model
        client.upload_file(str(path), s3_bucket, f"runs/pre/best/{path.name}")
    local = run_alexray("evaluate", pretrained, "--data", digits["a"], "--num-workers", 0, "--json",
                        "--no-progress", check=True)
    proc = run_alexray("evaluate", f"s3://{s3_bucket}/runs/pre", "--data", f"s3://{s3_bucket}/a", "--address",
                       env["RAY_ADDRESS"], "--workers", 3, "--num-workers", 0, "--json", "--no-progress",
                       env={**env, **s3_env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_ray, here = json.loads(proc.stdout), json.loads(local.stdout)
    assert on_ray["parts"] == 3 and on_ray["checkpoint"] == f"s3://{s3_bucket}/runs/pre/best"
    for key in ("samples", "correct_top1", "correct_top5", "skipped"):
        assert on_ray[key] == here[key], key
    assert on_ray["per_class"] == here["per_class"]

    # predict reads s3:// keys and prefixes
    source = sorted((digits["a_src"] / "val" / "2").iterdir())[0]
    client.upload_file(str(source), s3_bucket, "inbox/two.jpg")
    client.put_object(Bucket=s3_bucket, Key="inbox/more/notes.jpg", Body=b"not an image")
    proc = run_alexray("predict", f"s3://{s3_bucket}/runs/pre", f"s3://{s3_bucket}/inbox/", source, "--json",
                       "--no-progress", env=s3_env)
    assert proc.returncode == 2
    answers = {a["input"]: a for a in json.loads(proc.stdout)}
    assert answers[f"s3://{s3_bucket}/inbox/two.jpg"]["top"] == answers[str(source)]["top"]
    assert f"s3://{s3_bucket}/inbox/more/notes.jpg: not an image" in error_line(proc)


def test_an_unreachable_ray_address_fails_in_seconds(pretrained, digits, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    code, _, err = cli(capsys, "evaluate", pretrained, "--data", digits["a"], "--address", f"127.0.0.1:{port}",
                       "--no-progress")
    assert code == 2 and f"--address: nothing answers at 127.0.0.1:{port}" in one_error(err)
