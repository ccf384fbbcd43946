"""Metrics without a cluster: names and labels, the step timer, discovery files, the Prometheus
configuration (checked by promtool), the Grafana dashboard's structure, shard metrics and the
errors of ``alexray watch`` / ``alexray dashboard``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from alexray_core import discovery
from alexray_core.goodput import CATEGORIES
from orchestrator.prometheus import (
    Prometheus,
    PrometheusError,
    free_port,
    render_config,
    start_prometheus,
)
from tests.shardtools import run_alexray
from tests.support import datasets as ds

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
ALLOWED_LABELS = {"run", "rank", "node", "le", "phase", "split", "category"}


def _families(registry) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def _readme_metrics() -> set[str]:
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `(alexray_[a-z0-9_]+)` \|", text, re.MULTILINE))


class FakeCuda:
    type = "cuda"


@pytest.fixture
def worker(monkeypatch):
    import torch

    from workers.training.metrics import WorkerMetrics

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 456)
    from workers.training.ledger import Ledger

    metrics = WorkerMetrics("run-a", 1, "10.0.0.7", restarts=2, planned_steps=90, checkpoint_interval_steps=6,
                            device=FakeCuda(), flops_per_sample=2.2e9, peak_flops=989e12, ledger=Ledger())
    yield metrics
    metrics.close()


def _exercise(worker, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        worker.trained(32, 2.0 / (step + 1), 0.01, step // 10, step + 1, skipped=step % 2)
    worker.evaluated({"val_top1": 0.5, "val_top5": 0.9, "val_skipped": 3})
    worker.checkpoint_written(0.4, 1_000_000)


def test_worker_metric_names_follow_conventions_and_match_the_readme(worker):
    from data_prep.metrics import ShardMetrics

    _exercise(worker, 5)
    families = _families(worker.registry)
    shard = ShardMetrics("digits")
    shard.rejected("train", 2)
    shard.shard_written(type("R", (), {"split": "train", "samples": 10, "bytes": 999, "rejects": []})())
    families.update(_families(shard.registry))
    exposed = set()
    for family in families.values():
        assert family.name.startswith("alexray_"), family.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|gb|percent|minutes|hours)(_|$)", family.name), family.name
        if family.type == "counter":
            exposed.add(family.name + "_total")
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        else:
            exposed.add(family.name)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.documentation.lower() or "memory" in family.documentation.lower():
            assert family.name.endswith(("_bytes", "_bytes_total")) or family.type == "counter", family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
    assert exposed == _readme_metrics()  # one table in the README documents exactly these
    values = {s.name: s.value for f in families.values() for s in f.samples if s.labels.get("phase") != "eval"}
    assert values["alexray_worker_restarts_total"] == 2
    assert values["alexray_train_images_total"] == 5 * 32
    assert values["alexray_train_step"] == 5
    assert values["alexray_gpu_memory_used_bytes"] == 123
    assert values["alexray_checkpoint_written_bytes_total"] == 1_000_000
    assert values["alexray_data_corrupt_samples_skipped_total"] == 2  # steps 1 and 3 skipped one each
    assert values["alexray_shard_rejected_images_total"] == 2
    assert values["alexray_model_flops_per_sample"] == 2.2e9 and values["alexray_device_peak_flops"] == 989e12
    assert {s.labels["category"] for s in families["alexray_run_seconds"].samples} == set(CATEGORIES)


def test_series_do_not_grow_with_steps(worker):
    _exercise(worker, 3)
    before = sorted((s.name, tuple(sorted(s.labels.items())))
                    for f in _families(worker.registry).values() for s in f.samples)
    _exercise(worker, 500, start=3)
    after = sorted((s.name, tuple(sorted(s.labels.items())))
                   for f in _families(worker.registry).values() for s in f.samples)
    assert after == before
    labels = {k: v for _, ls in after for k, v in ls}
    assert labels["run"] == "run-a" and labels["rank"] == "1" and labels["node"] == "10.0.0.7"


def test_accuracy_is_absent_until_the_first_evaluation(worker):
    assert not _families(worker.registry)["alexray_eval_top1_ratio"].samples
    worker.evaluated({"val_top1": 0.25, "val_top5": 0.75, "val_skipped": 0})
    assert _families(worker.registry)["alexray_eval_top1_ratio"].samples[0].value == 0.25


def test_one_timer_splits_data_wait_from_step_time_for_the_series_and_the_ledger(worker):
    from workers.training.ledger import Ledger

    clock = [0.0]  # seconds, advanced by the loader and the steps below
    ledger = Ledger()
    ledger._clock, ledger._since, ledger._started_clock = (lambda: clock[0]), 0.0, 0.0

    def batches():
        for i in range(4):
            clock[0] += 0.25 * (i + 1)  # the loader: 0.25, 0.5, 0.75 and 1 s
            yield i
        clock[0] += 8.0  # finding the end of the data: no step follows, so it is no step's wait

    seen = []
    for batch in ledger.timed(batches(), 0, worker.observe_step):
        clock[0] += 0.5  # the step's compute
        seen.append(batch)
    assert seen == [0, 1, 2, 3]
    # the same readings in the ledger: the first wait is this start's, the end of the data is waited for
    seconds = ledger.totals()
    assert seconds["startup"] == 0.25 and seconds["data_wait"] == 0.5 + 0.75 + 1 + 8
    assert seconds["productive"] == 4 * 0.5
    values = {s.name: s.value for f in _families(worker.registry).values() for s in f.samples}
    assert values["alexray_train_step_duration_seconds_count"] == 4
    assert values["alexray_train_data_wait_seconds_total"] == 2.5
    assert values["alexray_train_step_duration_seconds_sum"] == 2.5 + 4 * 0.5  # each step includes its wait
    step_buckets = {s.labels["le"]: s.value for s in _families(worker.registry)["alexray_train_step_duration_seconds"]
                    .samples if s.name.endswith("_bucket")}
    assert step_buckets["1.0"] == 2 and step_buckets["+Inf"] == 4  # steps of 0.75, 1, 1.25 and 1.5 s


def test_metrics_off_gives_no_endpoint(monkeypatch):
    from alexray_core.spec import load_spec
    from workers.training.metrics import NullMetrics, worker_metrics

    monkeypatch.setenv("ALEXRAY_METRICS", "0")
    spec = load_spec({"data": {"path": "/nowhere"}})
    assert type(worker_metrics(spec, 0, 1, 0, 10, on_ray=False)) is NullMetrics


def test_a_process_without_ray_registers_and_removes_its_target(monkeypatch, tmp_path):
    from alexray_core.spec import load_spec
    from workers.training.metrics import worker_metrics

    monkeypatch.setenv(discovery.TARGETS_ENV, str(tmp_path))
    dead = tmp_path / "local-old-999999999.json"  # a process that was killed: no such pid
    dead.write_text("[]")
    spec = load_spec({"data": {"path": "/nowhere"}, "run": {"name": "solo"}})
    metrics = worker_metrics(spec, 0, 1, 0, 10, on_ray=False)  # 10 steps per epoch, 90 epochs by default
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"local-solo-{os.getpid()}.json"]
    entry = json.loads(files[0].read_text())[0]
    assert entry["labels"] == {"run": "solo", "rank": "0", "node": "127.0.0.1", "instance": "solo/0"}
    body = urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=5).read().decode()
    assert 'alexray_train_steps_planned{node="127.0.0.1",rank="0",run="solo"} 900.0' in body
    metrics.close()
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.heavy("Prometheus's promtool")
def test_promtool_accepts_the_config_and_the_rules(tmp_path):
    config = CLUSTER / "prometheus" / "prometheus.yml"
    done = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = sorted((CLUSTER / "prometheus" / "rules").glob("*.yml"))
    done = subprocess.run(["promtool", "check", "rules", *map(str, rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout and "SUCCESS: 6 rules found" in done.stdout
    import yaml

    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(render_config(tmp_path / "targets", None, "1s", "1s")))
    done = subprocess.run(["promtool", "check", "config", str(rendered)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_dashboard_is_provisioned_with_run_and_node_variables():
    import yaml

    board = json.loads((CLUSTER / "grafana" / "dashboards" / "alexray-throughput.json").read_text())
    source = yaml.safe_load((CLUSTER / "grafana" / "provisioning" / "datasources" / "alexray.yml").read_text())
    uid = source["datasources"][0]["uid"]
    provider = yaml.safe_load((CLUSTER / "grafana" / "provisioning" / "dashboards" / "alexray.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    assert [v["name"] for v in board["templating"]["list"]] == ["run", "node"]
    titles = [p["title"] for p in board["panels"]]
    for wanted in ("Images per second: run total", "Images per second per worker", "Data-wait fraction",
                   "Step time", "Training loss", "Validation accuracy"):
        assert wanted in titles
    names = {a["name"] for a in board["annotations"]["list"] if a.get("datasource", {}).get("uid") == uid}
    assert names == {"Checkpoints", "Restarts"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '$run' in target["expr"], (panel["title"], target["expr"])


def test_grafana_panels_write_units_and_colour_the_time_categories_as_the_page_does():
    from tests.test_formatting import page_category_colors

    board = json.loads((CLUSTER / "grafana" / "dashboards" / "alexray-throughput.json").read_text())
    panels = {p["title"]: p for p in board["panels"]}
    units = {title: p["fieldConfig"]["defaults"].get("unit") for title, p in panels.items()}
    for title in ("Images/s (run)", "Images per second: run total", "Images per second per worker"):
        assert units[title] == "count:img/s", title  # 1.2K img/s, not a bare 1.2 K
    assert units["Model FLOP/s and MFU"] == "flops" and units["Step time"] == "s"
    assert not [title for title, unit in units.items() if unit in (None, "short")], units
    time_goes = panels["Where the workers' time goes"]["fieldConfig"]["overrides"]
    colours = {}
    for override in time_goes:
        assert override["matcher"]["id"] == "byName", override
        (prop,) = override["properties"]
        assert prop["id"] == "color" and prop["value"]["mode"] == "fixed", override
        colours[override["matcher"]["options"]] = prop["value"]["fixedColor"]
    assert colours == page_category_colors()


def test_shard_metrics_count_what_the_manifest_says(tmp_path, monkeypatch):
    from data_prep.metrics import ShardMetrics
    from data_prep.pipeline import ShardConfig, shard_dataset

    monkeypatch.setenv(discovery.TARGETS_ENV, str(tmp_path / "targets"))
    data = ds.write_digits_dataset(tmp_path / "digits", train_per_class=6, val_per_class=2)
    (data.root / "train" / data.classes[0] / "broken.jpg").write_bytes(b"not an image")
    metrics = ShardMetrics("shards")
    summary = shard_dataset(str(data.root), str(tmp_path / "shards"),
                            ShardConfig(shard_size=16, workers=1, progress=False, max_reject_fraction=0.5), metrics)
    values = {(s.name, s.labels["split"]): s.value for f in _families(metrics.registry).values() for s in f.samples}
    for split, part in summary.manifest["splits"].items():
        assert values[("alexray_shard_images_total", split)] == part["samples"]
        assert values[("alexray_shard_written_bytes_total", split)] == part["bytes"]
        assert values[("alexray_shard_shards_total", split)] == len(part["shards"])
    assert values[("alexray_shard_rejected_images_total", "train")] == 1


def test_shard_cli_serves_and_unregisters_its_metrics(tmp_path):
    data = ds.write_digits_dataset(tmp_path / "digits", train_per_class=4, val_per_class=2)
    targets = tmp_path / "targets"
    done = run_alexray("shard", data.root, tmp_path / "out", "--workers", "1", "--no-progress", "--metrics-port", "0",
                       env={**os.environ, discovery.TARGETS_ENV: str(targets)})
    assert done.returncode == 0, done.stderr
    assert re.search(r"alexray shard: metrics on http://127\.0\.0\.1:\d+/metrics", done.stderr), done.stderr
    assert targets.is_dir() and not list(targets.iterdir())  # registered while it ran, removed at the end
    taken = free_port()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        done = run_alexray("shard", data.root, tmp_path / "out2", "--no-progress", "--metrics-port", taken)
    assert done.returncode == 2 and f"--metrics-port {taken}: cannot listen there" in done.stderr


def _alexray(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env or {**os.environ, "RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": ""})


def test_watch_and_dashboard_refuse_an_unreachable_prometheus():
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["watch", "--once"], ["dashboard", "--port", "0"]):
        done = _alexray(*command, "--prometheus", url)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"alexray {command[0]}: error: cannot reach Prometheus at {url}")
        assert "--prometheus URL" in lines[0]
    with pytest.raises(PrometheusError, match="not an http"):
        Prometheus("ftp://somewhere")


@pytest.mark.heavy("Prometheus")
def test_watch_names_the_missing_run_and_the_fix(tmp_path):
    with start_prometheus(tmp_path / "prom", targets_dir=tmp_path / "targets", ray_sd_file=None) as prom:
        done = _alexray("watch", "--once", "--prometheus", prom.url)
        assert done.returncode == 2
        assert done.stderr.strip() == (f"alexray watch: error: Prometheus at {prom.url} has no recent alexray training "
                                       "metrics: start a job ('alexray submit'), or check that this Prometheus reads "
                                       "the targets directory (README, Metrics)")
        jobs_api = f"http://127.0.0.1:{free_port()}"
        done = _alexray("watch", "nosuchrun", "--once", "--prometheus", prom.url, "--address", jobs_api)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"alexray watch: error: no run named 'nosuchrun' has metrics in Prometheus at "
                                   f"{prom.url}, and looking it up as a job failed: cannot reach the Ray cluster at "
                                   f"{jobs_api}")
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = _alexray("dashboard", "--prometheus", prom.url, "--port", port)
        assert done.returncode == 2
        assert done.stderr.strip().startswith(f"alexray dashboard: error: cannot serve on 127.0.0.1:{port} (")
        assert done.stderr.strip().endswith("pick another --port")
        # the alert rules were loaded from cluster/prometheus/rules
        rules = json.loads(urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5).read())["data"]["groups"]
        assert sorted(g["name"] for g in rules) == ["alexray-alerts", "alexray-recording"]


@pytest.mark.heavy("Prometheus")
def test_the_summary_of_a_run_that_no_longer_reports_keeps_its_last_values(monkeypatch, tmp_path):
    """A run's series go stale as soon as its workers are gone: the summary line (``watch``'s and the
    dashboard's) shows them as they were last scraped, and whether the run finished or when it last reported."""
    from alexray_core.spec import load_spec
    from orchestrator.monitor import render, snapshot, start_dashboard
    from tests.support.waiting import wait_until
    from workers.training.metrics import worker_metrics

    targets = tmp_path / "targets"
    monkeypatch.setenv(discovery.TARGETS_ENV, str(targets))
    with start_prometheus(tmp_path / "prom", targets_dir=targets, ray_sd_file=None, scrape_interval="1s",
                          evaluation_interval="1s") as started:
        prom = Prometheus(started.url)
        steps = {"ended": 4, "cut": 2}  # of 4 planned
        workers = []
        for run, done in steps.items():
            spec = load_spec({"data": {"path": "/nowhere"}, "run": {"name": run}, "train": {"max_steps": 4}})
            workers.append(worker_metrics(spec, 0, 1, 0, 10, on_ray=False))
            for step in range(done):
                workers[-1].trained(32, 1.0 / (step + 1), 0.01, 0, step + 1)
            workers[-1].evaluated({"val_top1": 0.5, "val_top5": 0.9, "val_skipped": 0})
        wait_until(lambda: prom.scalar_by("count_over_time(alexray_eval_top1_ratio[1m])", "run").keys() == steps.keys()
                   and min(prom.scalar_by("count_over_time(alexray_eval_top1_ratio[1m])", "run").values()) >= 2, 30,
                   "two scrapes of both runs")  # a rate needs two
        assert snapshot(prom, "cut")["state"] == "running"
        for worker in workers:
            worker.close()
        wait_until(lambda: not prom.query("alexray_train_step"), 30, "the series to go stale")
        ended = snapshot(prom, "ended", lookback_s=300)
        server = start_dashboard(started.url)
        try:
            with urllib.request.urlopen(f"{server.url}api/figures?run=cut&minutes=5", timeout=30) as response:
                page = json.loads(response.read())["summary"]
        finally:
            server.stop()
        never = snapshot(prom, "never")
    assert ended["state"] == "finished" and (ended["step"], ended["planned_steps"], ended["top1"]) == (4, 4, 0.5)
    assert ended["workers"] and ended["restarts"] == 0 and ended["eta_s"] is None
    assert re.search(r"step 4/4 .* restarts 0   finished$", render(ended, prom.url), re.MULTILINE)
    assert page["state"] == "stopped" and (page["step"], page["planned_steps"], page["top1"]) == (2, 4, 0.5)
    assert re.fullmatch(r"last report \d+ s ago", page["status"]), page["status"]
    assert 0 <= page["time"] - page["last_report"] < 60
    assert never["state"] == "none" and never["step"] is None
    assert "no report in the last 60 min for this run" in render(never, prom.url)

def test_the_driver_publishes_the_newest_worker_group_and_cleans_up(monkeypatch, tmp_path):
    """The GCS store is replaced by a dict: what matters here is what reaches the file."""
    from ray.experimental import internal_kv

    store: dict[bytes, bytes] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda k, v, overwrite=True, namespace=None: store.__setitem__(k.encode(), v.encode()))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda k, namespace=None: store.get(k))
    monkeypatch.setattr(internal_kv, "_internal_kv_list",
                        lambda prefix, namespace=None: [k for k in store if k.startswith(prefix.encode())])
    monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda k, del_by_prefix=False, namespace=None: [
        store.pop(key) for key in list(store) if key.startswith(k.encode())])
    monkeypatch.setenv(discovery.TARGETS_ENV, str(tmp_path))
    now = [1000.0]  # the registration times the newest worker group is told by
    monkeypatch.setattr(discovery, "time", SimpleNamespace(time=lambda: now[0]))

    def register(rank: int, world: int, port: int) -> None:
        labels = {"run": "r1", "rank": str(rank), "node": "10.0.0.1", "instance": f"r1/{rank}"}
        discovery.register_ray_target("r1", rank, world, f"10.0.0.1:{port}", labels)

    for rank in range(4):
        register(rank, 4, 9000 + rank)
    register(0, 4, 9100)  # a restarted rank 0 replaces its entry
    publisher = discovery.TargetPublisher("r1")
    publisher.publish_once()
    entries = json.loads((tmp_path / "r1.json").read_text())
    assert [e["targets"] for e in entries] == [["10.0.0.1:9100"], ["10.0.0.1:9001"], ["10.0.0.1:9002"],
                                               ["10.0.0.1:9003"]]
    now[0] += 1
    register(0, 2, 9200)  # an elastic restart with two workers: ranks 2 and 3 are gone
    register(1, 2, 9201)
    publisher.publish_once()
    entries = json.loads((tmp_path / "r1.json").read_text())
    assert [e["targets"] for e in entries] == [["10.0.0.1:9200"], ["10.0.0.1:9201"]]
    assert entries[1]["labels"] == {"run": "r1", "rank": "1", "node": "10.0.0.1", "instance": "r1/1"}
    with publisher:  # the thread: starts, publishes, and on exit removes the file and the keys
        pass
    assert not (tmp_path / "r1.json").exists() and not store
