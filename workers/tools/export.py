"""Ship a trained model: a standalone TorchScript or ONNX file, optionally int8, with a report.

The exported network takes what a decoder gives: uint8 RGB images, ``(N, 3, S, S)`` with ``S`` the
checkpoint's image size, and returns logits; the normalisation travels inside the file, so running
it needs only torch (TorchScript) or onnxruntime (ONNX), never this project. The class names and
preprocessing (resize the short side to ``eval_resize``, centre-crop ``S``) are stored in the file's
metadata (TorchScript: the extra file ``alexray.json``; ONNX: ``metadata_props``).

``--quantize int8`` is dynamic quantisation of the fully connected layers (``nn.Linear`` in torch,
``MatMul``/``Gemm`` in onnxruntime): int8 weights, activations quantised on the fly. AlexNet keeps
96% of its parameters there, so the file shrinks about 4x while the convolutions stay float. The
report measures the float export of the same format in the same run, so size, latency and top-1
are compared on the same machine, at the same moment.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alexray_core.errors import AlexrayError
from workers.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from workers.models.loading import LoadedModel, describe
from workers.tools.inference import check_classes

FORMATS = ("torchscript", "onnx")
QUANTIZATIONS = ("int8",)
METADATA = "alexray.json"


@dataclass
class ExportOptions:
    format: str = "torchscript"  # torchscript or onnx
    quantize: str | None = None  # None (float32) or int8: dynamic int8 quantisation of the FC layers
    output: str | None = None  # the model file to write; None: {checkpoint name}-{format}[-int8].{pt,onnx}
    data: str | None = None  # a sharded dataset whose split gives the top-1 comparison; None: none
    split: str = "val"  # that split
    val_samples: int = 500  # the first this many samples of the split are compared
    threads: int = 1  # CPU threads while latency is measured (1: latency on one core)
    latency_runs: int = 30  # batch-1 forward passes timed; the median is reported


class ExportedClassifier(nn.Module):
    """uint8 images in, logits out: the same arithmetic as ``transforms.to_model_input``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div(255.0)
        return self.model((x - self.mean) / self.std)


def metadata(loaded: LoadedModel, quantize: str | None) -> dict:
    return {"model": describe(loaded.info), "classes": loaded.classes, "image_size": loaded.image_size,
            "eval_resize": loaded.eval_resize, "input": "uint8 RGB images (N, 3, S, S), S = image_size",
            "output": "logits (N, classes); softmax gives probabilities", "quantize": quantize,
            "preprocess": "resize the short side to eval_resize, centre-crop image_size", "source": loaded.source}


def default_output(loaded: LoadedModel, options: ExportOptions) -> str:
    name = loaded.source.rstrip("/").rpartition("/")[2]
    if name == "best":
        name = f"{loaded.source.rstrip('/').rpartition('/')[0].rpartition('/')[2]}-best"
    suffix = "-int8" if options.quantize else ""
    return f"{name}-{options.format}{suffix}.{'pt' if options.format == 'torchscript' else 'onnx'}"


@contextlib.contextmanager
def _quiet():
    # The exporters and quantisers print progress, advice and deprecation notes meant for their
    # developers, on stdout, as warnings and through the root logger: none of it is for our users.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _write_torchscript(wrapper: nn.Module, example: torch.Tensor, path: str, meta: dict, quantize: str | None) -> None:
    with _quiet(), torch.no_grad():
        module = wrapper
        if quantize == "int8":
            from torch.ao.quantization import quantize_dynamic

            module = quantize_dynamic(wrapper, {nn.Linear}, dtype=torch.qint8)
        # Traced at the checkpoint's image size: AlexNet's pooling path depends on the input size,
        # so the file is made for exactly that size (any batch size).
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files={METADATA: json.dumps(meta)})


def _write_onnx(wrapper: nn.Module, example: torch.Tensor, path: str, meta: dict, quantize: str | None) -> None:
    import onnx

    with tempfile.TemporaryDirectory(prefix="alexray-onnx-") as tmp:
        float_path = path if quantize is None else os.path.join(tmp, "float.onnx")
        with _quiet(), torch.no_grad():
            torch.onnx.export(wrapper, (example,), float_path, dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes={"images": {0: torch.export.Dim.DYNAMIC}},
                              external_data=False, verbose=False)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quiet():
                quantize_dynamic(float_path, path, op_types_to_quantize=["MatMul", "Gemm"],
                                 weight_type=QuantType.QInt8)
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(meta)
    onnx.save(model, path)


def write(loaded: LoadedModel, path: str, fmt: str, quantize: str | None) -> None:
    wrapper = ExportedClassifier(loaded.model).eval()
    example = torch.zeros((2, 3, loaded.image_size, loaded.image_size), dtype=torch.uint8)
    meta = metadata(loaded, quantize)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        (_write_torchscript if fmt == "torchscript" else _write_onnx)(wrapper, example, tmp, meta, quantize)
        os.replace(tmp, path)  # a file under the name is always a finished export
    finally:
        Path(tmp).unlink(missing_ok=True)


def runner(path: str, fmt: str, threads: int):
    """A function from uint8 images (numpy NCHW) to logits (numpy) that runs the exported file."""
    if fmt == "torchscript":
        with _quiet():
            module = torch.jit.load(path, map_location="cpu").eval()

        def run(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(images)).numpy()

        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def _eager_runner(loaded: LoadedModel):
    wrapper = ExportedClassifier(loaded.model).eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(images)).numpy()

    return run


def val_subset(loaded: LoadedModel, data: str, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` samples of the split as evaluation crops (uint8 NCHW) and labels."""
    from workers.data.loader import eval_batches, load_manifest, split_info

    info = split_info(data, load_manifest(data), split)
    check_classes(loaded, info, data)
    images, labels, have = [], [], 0
    for batch in eval_batches(info, 1, 0, loaded.image_size, loaded.eval_resize, 64, 0):
        images.append(batch["images"].numpy())
        labels.append(batch["labels"].numpy())
        have += len(batch["labels"])
        if have >= count:
            break
    if not have:
        raise AlexrayError(f"--data: the {split} split of {data} has no readable samples to compare on")
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def random_images(loaded: LoadedModel, count: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 3, loaded.image_size, loaded.image_size), dtype=np.uint8)


def _logits(run, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([run(np.ascontiguousarray(images[i:i + batch])) for i in range(0, len(images), batch)])


def latency_ms(run, image: np.ndarray, runs: int, threads: int) -> float:
    """Median milliseconds of one batch-1 forward pass, after a warm-up."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            run(image)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            run(image)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times) * 1000


def _measure(run, images: np.ndarray, labels: np.ndarray | None, reference: np.ndarray, options: ExportOptions) -> dict:
    logits = _logits(run, images)
    top1 = logits.argmax(1)
    out = {"latency_ms_per_image": round(latency_ms(run, images[:1], options.latency_runs, options.threads), 3),
           "max_abs_logit_diff_vs_pytorch": float(np.abs(logits - reference).max()),
           "top1_agreement_with_pytorch": float((top1 == reference.argmax(1)).mean())}
    if labels is not None:
        out["top1"] = float((top1 == labels).mean())
    return out


def export(loaded: LoadedModel, options: ExportOptions, show_progress: bool = True) -> dict:
    """Write the model file and measure it against the float PyTorch model; returns the report."""
    from tqdm import tqdm

    if options.output and "://" in options.output:
        raise AlexrayError(f"--output: {options.output} is not a local path; export here, then upload the file")
    output = str(Path(options.output or default_output(loaded, options)).expanduser().absolute())
    stages = 4 if options.quantize else 3
    with tqdm(total=stages, desc="export", unit="stage", disable=not show_progress, dynamic_ncols=True) as bar:
        bar.set_postfix_str("reading the comparison images")
        if options.data:
            images, labels = val_subset(loaded, options.data, options.split, options.val_samples)
        else:
            images, labels = random_images(loaded), None
        reference = _logits(_eager_runner(loaded), images)
        bar.update(1)

        bar.set_postfix_str(f"writing {Path(output).name}")
        write(loaded, output, options.format, options.quantize)
        bar.update(1)

        bar.set_postfix_str("measuring the export")
        exported = {"file": output, "bytes": os.path.getsize(output),
                    **_measure(runner(output, options.format, options.threads), images, labels, reference, options)}
        bar.update(1)

        report = {"checkpoint": loaded.source, "model": describe(loaded.info), "format": options.format,
                  "quantize": options.quantize, "image_size": loaded.image_size, "threads": options.threads,
                  "compared_on": (f"{len(images)} samples of {options.data} ({options.split})" if labels is not None
                                  else f"{len(images)} random images (no --data: no top-1)"),
                  "exported": exported}
        if labels is not None:
            report["pytorch_top1"] = float((reference.argmax(1) == labels).mean())
        if options.quantize:
            bar.set_postfix_str(f"measuring the float {options.format} export for comparison")
            with tempfile.TemporaryDirectory(prefix="alexray-export-") as tmp:
                float_path = os.path.join(tmp, "float" + Path(output).suffix)
                write(loaded, float_path, options.format, None)
                report["float"] = {"bytes": os.path.getsize(float_path),
                                   **_measure(runner(float_path, options.format, options.threads), images, labels,
                                              reference, options)}
            bar.update(1)
            report["size_ratio_float_to_int8"] = round(report["float"]["bytes"] / exported["bytes"], 3)
            report["latency_ratio_float_to_int8"] = round(
                report["float"]["latency_ms_per_image"] / exported["latency_ms_per_image"], 3)
            if labels is not None:
                report["top1_change"] = round(exported["top1"] - report["float"]["top1"], 6)
        elif labels is not None:
            report["top1_change"] = round(exported["top1"] - report["pytorch_top1"], 6)
    return report
