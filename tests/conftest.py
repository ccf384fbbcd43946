"""Shared fixtures: a real S3 server (SeaweedFS), fresh buckets, and small real-photo datasets."""

from __future__ import annotations

import itertools
import os
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
# or chromium and take seconds. A test is heavy when it says so (`@pytest.mark.heavy("reason")`, or a
# module's `pytestmark`), or when it uses a fixture below, which starts one of them (directly or
# through another fixture). tests/test_suite_rules.py checks that a test starting a service is heavy.
HEAVY_FIXTURES = {
    "s3_server": "SeaweedFS", "s3_env": "SeaweedFS", "s3_bucket": "SeaweedFS",
    "ray_cluster": "a Ray cluster",
    "jobs_cluster": "a Ray cluster (test_jobs)",
    "nodes": "a three-node Ray cluster (test_multinode)",
    "monitored": "a two-node Ray cluster and Prometheus (test_metrics_ray)",
}
# Every collected test, before `-m` deselects any: what tests/test_suite_rules.py checks.
COLLECTED = pytest.StashKey[list]()

# `make test TEST_WORKERS=2` runs the files on two pytest-xdist workers, a file on one worker (its module-scoped
# clusters are started once), handed out in collection order. These files take minutes each (in
# this order, longest first, as measured on 2 cores): run first, so no long file starts last and
# keeps one worker busy alone. A file missing here only runs later; nothing else depends on it.
LONGEST_FIRST = ("test_multinode.py", "test_jobs.py", "test_training_ray.py", "test_demo.py",
                 "test_faults_checkpoint.py", "test_model_tools.py", "test_metrics_ray.py", "test_faults_security.py",
                 "test_training.py", "test_faults_data.py")

# Ray Train's controller polls its workers every 2 s by default: each run's end, each failure and
# each checkpoint report waits for the next poll (the end of a short run on 2 cores: 6.1 s from the
# group's start to the summary at 2 s, 2.9 s at 0.5 s). Polling every 0.5 s tests the same
# behaviour; every process the tests start inherits it, Ray clusters and their jobs included.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and an
    # ignored signal stays ignored across exec in every process the tests start: the Ctrl-C tests
    # would see nothing. A handler here is reset to the default in those processes instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "heavy(reason): starts SeaweedFS, Ray, Prometheus or chromium, or "
                                       "trains for tens of seconds; left out by 'make test-fast'")


def heavy_fixture_reason(item: pytest.Item) -> str | None:
    """Why ``item`` is heavy by the fixtures it uses, or None."""
    used = [name for name in getattr(item, "fixturenames", ()) if name in HEAVY_FIXTURES]
    return HEAVY_FIXTURES[used[0]] if used else None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``heavy`` every test that uses a fixture starting a service (``HEAVY_FIXTURES``); put
    the ``LONGEST_FIRST`` files first (a stable sort: the order within a file is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    config.stash[COLLECTED] = list(items)
    for item in items:
        reason = heavy_fixture_reason(item)
        if reason is not None and item.get_closest_marker("heavy") is None:
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


def seconds_per_file(reports) -> dict[str, tuple[float, int]]:
    """``{test file: (seconds of setup, call and teardown, tests)}`` from a run's test reports."""
    seconds: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    for report in reports:
        duration = getattr(report, "duration", None)
        when = getattr(report, "when", None)
        if duration is None or when not in ("setup", "call", "teardown"):
            continue  # a collection report, or another plugin's record
        path = report.nodeid.split("::", 1)[0]
        seconds[path] = seconds.get(path, 0.0) + duration
        tests.setdefault(path, set()).add(report.nodeid)
    return {path: (seconds[path], len(tests[path])) for path in seconds}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The time each test file took, slowest first, and their total: what a new test costs shows here."""
    reports = [report for category in terminalreporter.stats.values() for report in category]
    per_file = seconds_per_file(reports)
    if not per_file:
        return
    terminalreporter.write_sep("=", "time per test file (setup + call + teardown)")
    for path, (seconds, count) in sorted(per_file.items(), key=lambda entry: (-entry[1][0], entry[0])):
        terminalreporter.write_line(f"{seconds:8.1f} s  {path} ({count} test{'s' if count != 1 else ''})")
    total = sum(seconds for seconds, _ in per_file.values())
    terminalreporter.write_line(f"{total:8.1f} s  total, {len(per_file)} files")


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
