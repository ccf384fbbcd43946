"""The ``alexray`` command: one entry point, one subcommand per stage of the product.

Subcommands import their stage lazily so that, for example, submitting a job never imports torch.
"""

from __future__ import annotations

import sys

from alexray_core.errors import EXIT_USAGE, AlexrayError

USAGE = """usage: alexray COMMAND [ARGS]

commands:
  shard SRC DEST      shard an ImageFolder/ImageNet dataset into WebDataset tars (local dir or s3://)
  shard verify DEST   re-read a sharded dataset and check it against its manifest
  train SPEC.yaml     train on a Ray cluster (a local one when none is given), wait for the end
  submit SPEC.yaml    validate, preflight and submit a training run through Ray's Jobs API
  status [JOB]        state, progress and newest checkpoint of a job
  logs JOB            a job's output (--follow to stream it)
  stop JOB            stop a running job
  list                alexray jobs on the cluster
  resume RUN_NAME     resubmit a run so it continues from its newest checkpoint
  watch [JOB]         live terminal view of a running job's throughput, data-wait, loss and ETA
  dashboard           a local web page that plots the same figures live from Prometheus
  evaluate CKPT       top-1/top-5 of a checkpoint on a dataset's val shards
  predict CKPT IMG... top-5 classes of new images
  finetune SPEC.yaml  train a new classifier on a trained backbone (--from CKPT, WEIGHTS.pth or torchvision:NAME)
  export CKPT         a standalone TorchScript/ONNX model file, optionally int8-quantised

Run 'alexray COMMAND --help' for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else EXIT_USAGE
    try:
        return _run(argv[0], argv)
    except AlexrayError as e:  # a command that does not report its own still gives one line and its exit code
        print(f"alexray {argv[0]}: error: {e}", file=sys.stderr)
        return e.exit_code


def _run(command: str, argv: list[str]) -> int:
    rest = argv[1:]
    if command == "shard":
        from data_prep.cli import main as shard_main

        return shard_main(rest)
    if command == "train":
        from workers.training.cli import main as train_main

        return train_main(rest)
    if command in ("submit", "status", "logs", "stop", "list", "resume"):
        from .commands import main as jobs_main

        return jobs_main(argv)
    if command in ("watch", "dashboard"):
        from .monitor import main as monitor_main

        return monitor_main(argv)
    if command in ("evaluate", "predict", "finetune", "export"):
        from workers.tools.cli import main as model_main

        return model_main(argv)
    print(f"alexray: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
