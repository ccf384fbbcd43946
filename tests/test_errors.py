"""Errors users can trust: one base for the problems a user can fix, their exit codes, and CLIs that
report those on one line while any other exception (a bug) keeps its traceback."""

from __future__ import annotations

import pytest

from alexray_core.discovery import TargetsDirError
from alexray_core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, AlexrayError
from alexray_core.localcluster import ClusterStartError
from alexray_core.spec import SpecError
from alexray_core.storage import StorageError
from data_prep.errors import ShardError
from orchestrator.monitor import MonitorError
from orchestrator.prometheus import PrometheusError
from orchestrator.rayclient import JobError
from tests.shardtools import error_line, run_alexray
from workers.models.checkpoint_format import CheckpointError

ERRORS = (SpecError, CheckpointError, ShardError, StorageError, MonitorError, TargetsDirError, ClusterStartError,
          JobError, PrometheusError)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_an_alexray_error_and_no_value_error(cls):
    assert issubclass(cls, AlexrayError) and not issubclass(cls, ValueError)
    error = cls("x: bad; do y")
    assert error.exit_code == EXIT_USAGE and str(error) == "x: bad; do y"


def _raise(error: BaseException) -> None:
    raise error


def test_an_instance_may_carry_its_own_exit_code():
    assert JobError("job failed", exit_code=EXIT_FAILED).exit_code == EXIT_FAILED
    assert ShardError("too many rejects", EXIT_FAILED).exit_code == EXIT_FAILED
    assert JobError("bad address").exit_code == EXIT_USAGE


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_train_with_a_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    from workers.training.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {path: /data}\ntrain: {epocs: 3}\n")
    assert main([str(spec), "--no-ray"]) == EXIT_USAGE
    line = _one_error_line(capsys, "alexray train")
    assert line.startswith("alexray train: error: train.epocs: unknown key; did you mean 'epochs'?")


def test_the_alexray_command_with_a_bad_spec_exits_2_with_one_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {path: /data}\n")
    proc = run_alexray("train", spec, "--set", "train.schedule=linear", timeout=120)
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert error_line(proc) == "alexray train: error: train.schedule: 'linear' is not one of step, plateau, cosine"


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, KeyError])
def test_train_lets_a_bug_through_with_its_traceback(tmp_path, monkeypatch, bug):
    import workers.training.cli

    def broken(*_args, **_kwargs):
        raise bug("a bug, not a usage error")

    monkeypatch.setattr(workers.training.cli, "load_spec", broken)
    with pytest.raises(bug, match="a bug"):
        workers.training.cli.main([str(tmp_path / "spec.yaml"), "--no-ray"])


def test_a_data_failure_during_a_local_run_fails_the_run(tmp_path, monkeypatch, capsys):
    import workers.training.cli
    import workers.training.driver
    import workers.training.loop

    spec = tmp_path / "spec.yaml"
    spec.write_text("run: {name: gone}\ndata: {path: /data}\n")

    def vanished(*_args, **_kwargs):
        raise StorageError("s3://b/ds/train-000001.tar no longer exists: the dataset changed during the run")

    monkeypatch.setattr(workers.training.driver, "prepare_run", lambda spec: str(tmp_path / "runs" / "gone"))
    monkeypatch.setattr(workers.training.loop, "run_local", vanished)
    assert workers.training.cli.main([str(spec), "--no-ray"]) == EXIT_FAILED
    line = _one_error_line(capsys, "alexray train")
    assert line == ("alexray train: error: training failed: s3://b/ds/train-000001.tar no longer exists: "
                    "the dataset changed during the run")


def test_ctrl_c_in_train_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import workers.training.cli
    import workers.training.driver
    import workers.training.loop

    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {path: /data}\n")

    def named(spec):
        spec.run.name = "alexnet-20260101-000000-abcdef"
        return str(tmp_path / "runs" / spec.run.name)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workers.training.driver, "prepare_run", named)
    monkeypatch.setattr(workers.training.loop, "run_local", interrupted)
    assert workers.training.cli.main([str(spec), "--no-ray"]) == EXIT_INTERRUPTED
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["alexray train: interrupted; to continue from its newest checkpoint, run the same command "
                     "with --set run.name=alexnet-20260101-000000-abcdef"]


@pytest.mark.parametrize("error, code", [(ShardError("--shard-size: bad; use 1000"), EXIT_USAGE),
                                         (ShardError("too many rejects", EXIT_FAILED), EXIT_FAILED),
                                         (SpecError("data.path: nope"), EXIT_USAGE)])
def test_shard_reports_an_alexray_error_with_its_exit_code(monkeypatch, capsys, error, code):
    import data_prep.cli

    monkeypatch.setattr(data_prep.cli, "run_shard", lambda argv: _raise(error))
    assert data_prep.cli.main(["src", "dest"]) == code
    assert _one_error_line(capsys, "alexray shard") == f"alexray shard: error: {error}"


@pytest.mark.parametrize("bug", [RuntimeError, ValueError])
def test_shard_lets_a_bug_through(monkeypatch, bug):
    import data_prep.cli

    monkeypatch.setattr(data_prep.cli, "run_verify", lambda argv: _raise(bug("a bug")))
    with pytest.raises(bug, match="a bug"):
        data_prep.cli.main(["verify", "dest"])


def test_a_shard_option_out_of_range_is_a_usage_error(capsys, tmp_path):
    import data_prep.cli

    (tmp_path / "src").mkdir()
    assert data_prep.cli.main([str(tmp_path / "src"), str(tmp_path / "dest"), "--quality", "101",
                               "--no-progress"]) == EXIT_USAGE
    assert _one_error_line(capsys, "alexray shard") == "alexray shard: error: quality must be in 1..100, not 101"


@pytest.mark.parametrize("bug", [RuntimeError, ValueError])
def test_model_commands_let_a_bug_through(monkeypatch, bug):
    import workers.tools.cli

    monkeypatch.setattr(workers.tools.cli, "_evaluate", lambda args, prog: _raise(bug("a bug")))
    with pytest.raises(bug, match="a bug"):
        workers.tools.cli.main(["evaluate", "some-checkpoint"])


def test_model_commands_report_a_checkpoint_error_on_one_line(tmp_path, capsys):
    import workers.tools.cli

    assert workers.tools.cli.main(["evaluate", str(tmp_path / "nothing-here"), "--no-progress"]) == EXIT_USAGE
    assert str(tmp_path / "nothing-here") in _one_error_line(capsys, "alexray evaluate")


@pytest.mark.parametrize("error, code", [(JobError("--address: bad; pass http://HEAD:8265"), EXIT_USAGE),
                                         (JobError("job raysubmit_1 FAILED", exit_code=EXIT_FAILED), EXIT_FAILED)])
def test_job_commands_report_an_alexray_error_with_its_exit_code(monkeypatch, capsys, error, code):
    import orchestrator.jobs
    from orchestrator.commands import main

    monkeypatch.setattr(orchestrator.jobs, "status", lambda *a, **k: _raise(error))
    assert main(["status", "some-job"]) == code
    assert _one_error_line(capsys, "alexray status") == f"alexray status: error: {error}"


def test_job_commands_let_a_bug_through(monkeypatch):
    import orchestrator.jobs
    from orchestrator.commands import main

    monkeypatch.setattr(orchestrator.jobs, "status", lambda *a, **k: _raise(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["status", "some-job"])
