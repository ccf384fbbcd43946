"""Prometheus metrics of ``alexray shard --metrics-port PORT``: images, bytes, shards and rejects.

Counted in the parent process as each shard is finished (by a local worker or a Ray task), with
the labels ``run`` (DEST's last path element) and ``split``. Shards kept from an interrupted run
are not counted again. The endpoint is registered in the Prometheus targets directory like any
process without Ray (``alexray_core.discovery``) and removed when sharding ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

from alexray_core import discovery

disable_created_metrics()
LABELS = ("run", "split")


class ShardMetrics:
    def __init__(self, run: str):
        self.run = run
        self.registry = registry = CollectorRegistry()
        self._images = Counter("alexray_shard_images", "Images written into shards", LABELS, registry=registry)
        self._bytes = Counter("alexray_shard_written_bytes", "Shard bytes written", LABELS, registry=registry)
        self._shards = Counter("alexray_shard_shards", "Shards written", LABELS, registry=registry)
        self._rejects = Counter("alexray_shard_rejected_images", "Inputs rejected (unreadable, not an image, too large)",
                                LABELS, registry=registry)
        self._endpoint: discovery.MetricsEndpoint | None = None
        self.url = None

    def serve(self, port: int, host: str = "127.0.0.1") -> str:
        self._endpoint = discovery.MetricsEndpoint(self.registry, host, port)
        self._endpoint.announce(f"shard-{self.run}", {"run": self.run, "instance": f"shard/{self.run}", "node": host})
        self.url = f"http://{self._endpoint.address}/metrics"
        return self.url

    def rejected(self, split: str, count: int) -> None:
        if count:
            self._rejects.labels(self.run, split).inc(count)

    def shard_written(self, result) -> None:
        """``result``: a ``ShardResult`` (samples, bytes, late rejects of one shard)."""
        self._images.labels(self.run, result.split).inc(result.samples)
        self._bytes.labels(self.run, result.split).inc(result.bytes)
        self._shards.labels(self.run, result.split).inc()
        self.rejected(result.split, len(result.rejects))

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()


def run_label(dest: str) -> str:
    return discovery.safe_name(dest.rstrip("/").rsplit("/", 1)[-1] or dest)
