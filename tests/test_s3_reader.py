"""The one reader of S3 objects, through each of its users: the reader itself, ``S3Storage`` and the
training loader's ``s3://`` opener.

A connection cut part-way through an object is resumed with a ranged GET from the byte where it
broke. That ranged GET is pinned by If-Match to the version the read started on: when the object was
replaced in between, the read fails naming it, rather than hand out the start of one version spliced
onto the rest of another.
"""

from __future__ import annotations

import os
from typing import Callable

import boto3
import pytest
from webdataset.gopen import gopen

from alexray_core.storage import S3Storage, StorageError
from alexray_core.storage import s3reader
from alexray_core.storage.s3reader import ResumableS3Reader
from tests.test_workers_data import _CuttingProxy
from workers.data.s3open import use_s3_reader

MIB = 1 << 20
SIZE = 4 * MIB
CUT_AFTER = 3 * MIB // 2  # the first response stops here: after the first MiB read, inside the second
SHARD = "ds/train-000000.tar"
ENTRY_POINTS = ("reader", "storage", "loader")


def _read_in_two(entry: str, bucket: str, proxy_url: str, s3_server, got: list[bytes],
                 between: Callable[[], None], monkeypatch) -> None:
    """Read the shard through ``entry`` by way of the cutting proxy: one MiB, then ``between()``,
    then the rest; every piece read is appended to ``got``, also when the read fails."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=proxy_url, region_name="us-east-1",
        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    if entry == "reader":
        with ResumableS3Reader(bucket, SHARD, client=client, base_delay=0.05) as reader:
            got.append(reader.read(MIB))
            between()
            while data := reader.read(MIB):
                got.append(data)
    elif entry == "storage":
        chunks = S3Storage(f"s3://{bucket}/ds", client=client).iter_chunks(SHARD.removeprefix("ds/"), MIB)
        got.append(next(chunks))
        between()
        got.extend(chunks)
    else:  # as the training loader opens a shard: webdataset's gopen with the s3 scheme registered
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy_url)
        s3reader.reset_client()
        use_s3_reader()
        with gopen(f"s3://{bucket}/{SHARD}", "rb") as stream:
            got.append(stream.read(MIB))
            between()
            while data := stream.read(MIB):
                got.append(data)


@pytest.fixture
def proxy(s3_server, s3_env):
    cutting = _CuttingProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), cut_after=CUT_AFTER)
    try:
        yield cutting
    finally:
        cutting.close()
        s3reader.reset_client()  # the loader's client may point at the proxy


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_read_cut_part_way_resumes_and_returns_the_whole_object(entry, proxy, s3_server, s3_bucket,
                                                                  monkeypatch):
    shard = os.urandom(SIZE)
    s3_server.client().put_object(Bucket=s3_bucket, Key=SHARD, Body=shard)
    got: list[bytes] = []
    _read_in_two(entry, s3_bucket, f"http://127.0.0.1:{proxy.port}", s3_server, got, lambda: None, monkeypatch)
    assert proxy.cuts == 1  # the first response really was cut short
    assert b"".join(got) == shard


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_shard_replaced_between_two_ranged_reads_fails_the_read_naming_it(entry, proxy, s3_server, s3_bucket,
                                                                            monkeypatch):
    first, second = os.urandom(SIZE), os.urandom(SIZE)  # the same size: a splice would not show in the length
    direct = s3_server.client()
    direct.put_object(Bucket=s3_bucket, Key=SHARD, Body=first)
    got: list[bytes] = []

    def replace():
        direct.put_object(Bucket=s3_bucket, Key=SHARD, Body=second)

    with pytest.raises(StorageError) as raised:
        _read_in_two(entry, s3_bucket, f"http://127.0.0.1:{proxy.port}", s3_server, got, replace, monkeypatch)
    message = str(raised.value)
    assert message.startswith(f"s3://{s3_bucket}/{SHARD} changed while it was being read"), message
    assert message.endswith("read it again" if entry == "storage" else "run again (training resumes from its "
                                                                        "last checkpoint)"), message
    assert "\n" not in message
    assert proxy.cuts == 1
    read = b"".join(got)
    assert len(read) >= MIB and read == first[:len(read)]  # nothing of the new version was handed out
