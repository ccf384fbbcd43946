"""Shared fixtures: a real S3 server (SeaweedFS), fresh buckets, and small real-photo datasets."""

from __future__ import annotations

import itertools
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds")


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

    from orchestrator.localcluster import start_local_cluster, stop_local_cluster

    home = tmp_path_factory.mktemp("ray-home")
    env = {**os.environ, **s3_server.env(), "HOME": str(home), "RAY_DEDUP_LOGS": "0"}
    cluster = start_local_cluster(num_cpus=4, dashboard=False, token_auth=False, env=env)
    try:
        yield cluster.gcs_address, {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    finally:
        left = stop_local_cluster(cluster)
        assert not left, f"Ray processes left behind: {left}"
