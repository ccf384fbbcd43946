"""Shared fixtures: a real S3 server (SeaweedFS), fresh buckets, and small real-photo datasets."""

from __future__ import annotations

import itertools
import signal
import uuid
from pathlib import Path

import pytest

from tests.support import datasets
from tests.support.s3server import S3Server

_SERVER_KEY = pytest.StashKey[S3Server]()
_S3_FIXTURES = {"s3_server", "s3_bucket", "s3_env"}

# Variables that would send boto3 elsewhere than the test server, removed while a test uses it.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_S3_ADDRESSING_STYLE",
)


# `make test-fast` runs what is not marked `heavy`: tests that start no SeaweedFS, Ray, Prometheus
# or chromium and take seconds. A test is heavy when it uses a fixture that starts one of them
# (directly or through another fixture), is listed below (it starts one itself, or trains for tens
# of seconds), or is marked `slow`.
_HEAVY_FIXTURES = {
    "s3_server": "SeaweedFS", "s3_env": "SeaweedFS", "s3_bucket": "SeaweedFS",
    "ray_cluster": "a Ray cluster",
    "jobs_cluster": "a Ray cluster (test_jobs)",
    "nodes": "a three-node Ray cluster (test_multinode)",
    "monitored": "a two-node Ray cluster and Prometheus (test_metrics_ray)",
}
# Node ids (a module, a test, or one parametrization of it) of tests that start a service themselves.
_HEAVY_TESTS = {
    "tests/test_demo.py": "the demo: a Ray cluster and Prometheus",
    "tests/test_multinode.py": "a three-node Ray cluster",
    "tests/test_metrics_ray.py": "a two-node Ray cluster, Prometheus and chromium",
    "tests/test_shard_ray.py": "a Ray cluster",
    "tests/test_training_ray.py": "a Ray cluster ('alexray train' starts its own)",
    "tests/test_support.py::test_server_lifecycle_leaves_no_process_behind": "SeaweedFS",
    "tests/test_support.py::test_restart_is_stop_then_start_on_the_same_ports": "SeaweedFS",
    "tests/test_faults_shard.py::test_a_second_run_into_the_same_dest_is_refused[s3]": "SeaweedFS",
    "tests/test_faults_shard.py::test_the_lease_is_taken_once_and_taken_over_only_when_stale[s3]": "SeaweedFS",
    "tests/test_faults_security.py::test_a_targets_directory_of_another_user_is_refused": "Prometheus",
    "tests/test_metrics.py::test_promtool_accepts_the_config_and_the_rules": "Prometheus's promtool",
    "tests/test_metrics.py::test_watch_names_the_missing_run_and_the_fix": "Prometheus",
    "tests/test_packaging.py": "Prometheus's promtool, on the files of a wheel it builds and installs",
    # No service, but minutes on two cores together: runs of `alexray train` / `python -m workers train`.
    "tests/test_model_tools.py": "trains the models it evaluates, exports and fine-tunes (about 2 min)",
    "tests/test_training.py::test_resuming_by_run_name_continues_mid_epoch_bitwise": "three training runs",
    "tests/test_training.py::test_gpu_benchmark_script_runs_on_cpu": "bench/gpu.py's quick run",
    "tests/test_faults_checkpoint.py::test_killed_run_leaves_no_checkpoint_scratch_behind": "three training runs",
    "tests/test_faults_data.py::test_out_of_range_class_is_skipped_and_the_skipped_ceiling_fails_the_run":
        "two training runs",
    "tests/test_faults_data.py::test_ddp_ranks_agree_to_skip_a_step_that_is_empty_everywhere": "two DDP processes",
}


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and an
    # ignored signal stays ignored across exec in every process the tests start: the Ctrl-C tests
    # would see nothing. A handler here is reset to the default in those processes instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds")
    config.addinivalue_line("markers", "heavy(reason): starts SeaweedFS, Ray, Prometheus or chromium, or "
                                       "trains for tens of seconds; left out by 'make test-fast'")


def _heavy_reason(item: pytest.Item) -> str | None:
    node = item.nodeid
    for key in (node, node.split("[", 1)[0], node.split("::", 1)[0]):
        if key in _HEAVY_TESTS:
            return _HEAVY_TESTS[key]
    used = [name for name in getattr(item, "fixturenames", ()) if name in _HEAVY_FIXTURES]
    if used:
        return _HEAVY_FIXTURES[used[0]]
    if item.get_closest_marker("slow") is not None:
        return "marked slow"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``heavy`` every test that starts a service or trains for long (``_HEAVY_FIXTURES``, ``_HEAVY_TESTS``)."""
    for item in items:
        reason = _heavy_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.heavy(reason))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """One SeaweedFS S3 server for the whole session (started on first use, stopped at the end).

    Tests may ``stop()``/``start()``/``restart()`` it to simulate outages; it comes back on the same
    ports with the same data. The fixture makes sure it is running for every test that asks for it.
    """
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    pytestconfig.stash[_SERVER_KEY] = server
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment that points boto3's standard chain at the test server.

    Also applied to this process (via monkeypatch, undone after the test); returns a fresh dict that a
    test can pass, possibly amended, to a subprocess.
    """
    if not s3_server.running:  # an earlier test stopped it and did not start it again
        s3_server.start()
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return dict(env)


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_env: dict[str, str]):
    """A fresh, uniquely named, empty bucket on the test server; deleted (best effort) afterwards."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.create_bucket(name)
    yield name
    if s3_server.running:
        try:
            s3_server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10).delete_bucket(
                Bucket=name)
        except Exception:
            pass  # leftovers only cost disk in the session's temporary folder


@pytest.fixture
def make_dataset(tmp_path: Path):
    """Factory for small datasets under ``tmp_path``.

    ``make_dataset(layout="imagenet", root=None, **kwargs) -> DatasetInfo`` where layout is
    "imagenet" (``make_imagenet_layout``), "kaggle" (``make_kaggle_val_layout``) or "digits"
    (``write_digits_dataset``; needs ``train_per_class`` and ``val_per_class``). Without ``root`` each
    call writes to a new folder ``tmp_path/<layout>-<n>``.
    """
    counter = itertools.count()
    builders = {
        "imagenet": datasets.make_imagenet_layout,
        "kaggle": datasets.make_kaggle_val_layout,
        "digits": datasets.write_digits_dataset,
    }

    def make(layout: str = "imagenet", root: str | Path | None = None, **kwargs) -> datasets.DatasetInfo:
        if layout not in builders:
            raise ValueError(f"unknown layout {layout!r}; choose from {sorted(builders)}")
        if root is None:
            root = tmp_path / f"{layout}-{next(counter)}"
        return builders[layout](Path(root), **kwargs)

    return make


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Bring the session's S3 server back if an earlier test stopped it and left it down."""
    if not _S3_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return
    server = item.config.stash.get(_SERVER_KEY, None)
    if server is not None and server.ports is not None and not server.running:
        server.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """When a test that used the S3 server fails, show the tail of the SeaweedFS log in the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    if not _S3_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return
    server = item.config.stash.get(_SERVER_KEY, None)
    if server is None:
        return
    tail = server.log_tail(80)
    if tail:
        report.sections.append((f"SeaweedFS log, last 80 lines ({server.log_path})", tail))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A real one-node Ray cluster on 127.0.0.1 for the whole session: ``(address, env)``.

    HOME is isolated (Ray writes ~/.ray state there). The node gets the test S3 server's
    credentials in its environment, as a cloud node gets them from its instance role: Ray's
    controller and workers reach run storage with their own credential chain. Commands that should
    reach the cluster get ``env``. Teardown stops this cluster's processes only.
    """
    import os

    from alexray_core.localcluster import start_local_cluster, stop_local_cluster

    home = tmp_path_factory.mktemp("ray-home")
    env = {**os.environ, **s3_server.env(), "HOME": str(home), "RAY_DEDUP_LOGS": "0"}
    cluster = start_local_cluster(num_cpus=4, dashboard=False, token_auth=False, env=env)
    try:
        yield cluster.gcs_address, {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    finally:
        left = stop_local_cluster(cluster)
        assert not left, f"Ray processes left behind: {left}"
