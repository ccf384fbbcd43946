"""Metrics of a real training run: a Ray cluster of two nodes on this machine (one CPU each, so the
two workers run on different nodes), Debian's Prometheus started with cluster/prometheus/ and a
1 s scrape, and ``alexray train`` as the driver. The tests share the run and go in file order:
scraping, labels, ``alexray watch``, a killed worker, the dashboard page in headless Chromium,
then every Grafana query against what Prometheus collected.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from alexray_core import discovery
from alexray_core.goodput import CATEGORIES
from alexray_core.localcluster import start_local_cluster, stop_local_cluster
from orchestrator.prometheus import Prometheus, free_port, start_prometheus
from tests.support.waiting import wait_until
from tests.trainingtools import ray_train_pids, sharded_digits, write_spec

pytestmark = pytest.mark.heavy("a two-node Ray cluster, Prometheus and chromium")

ROOT = Path(__file__).resolve().parent.parent
RUN = "watched"
SEL = f'run="{RUN}"'


@dataclass
class Monitored:
    prom: Prometheus
    cluster: object
    proc: subprocess.Popen
    targets: Path
    started: float
    root: Path


def _driver_log(proc: subprocess.Popen) -> str:
    """The tail of ``alexray train``'s log: ``wait_until``'s ``output`` for the driver."""
    return Path(proc.log_path).read_text(errors="replace")[-3000:]


def _per_rank(prom: Prometheus, expr: str) -> dict[str, float]:
    return prom.scalar_by(expr, "rank")


def _nodes(monitored) -> set[str]:
    """The node addresses Ray gave the workers (Ray resolves 127.0.0.1 to the machine's address)."""
    entries = json.loads((monitored.targets / f"{RUN}.json").read_text())
    nodes = {e["labels"]["node"] for e in entries}
    assert nodes == {e["targets"][0].rsplit(":", 1)[0] for e in entries}  # bound where the label says
    return nodes


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-ray")
    digits = sharded_digits(root)
    targets = root / "targets"
    home = root / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_DEDUP_LOGS": "0", discovery.TARGETS_ENV: str(targets)}
    cluster = start_local_cluster(num_cpus=1, dashboard=False, token_auth=False, env=env, loopback_only=False)
    prom = proc = None
    try:
        # A second node with its own temp dir inside the cluster's, so teardown finds its processes.
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", f"--address={cluster.gcs_address}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=0", f"--temp-dir={cluster.temp_dir}/node2",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                        "--disable-usage-stats"], env=cluster.env, check=True, capture_output=True, timeout=180)
        prom = start_prometheus(root / "prometheus", targets_dir=targets, ray_sd_file=None,
                                scrape_interval="1s", evaluation_interval="1s")
        spec = write_spec(root / "spec.yaml", str(digits), str(root / "runs"), run={"name": RUN},
                          train={"epochs": 40, "log_every": 6, "peak_tflops": 0.05}, failure={"max_failures": 3},
                          debug={"step_delay": 0.15}, scaling={"num_workers": 2, "cpus_per_worker": 1.0})
        started = time.time()
        log = open(root / "driver.log", "w")  # a file, not a pipe: a full pipe would block the driver
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(spec)], cwd=ROOT,
                                env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "PYTHONUNBUFFERED": "1"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = log.name
        yield Monitored(Prometheus(prom.url), cluster, proc, targets, started, root)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        left = stop_local_cluster(cluster)
        if prom is not None:
            prom.stop()
        assert not left, f"Ray processes left behind: {left}"


def test_prometheus_scrapes_every_worker_of_a_two_node_run(monitored):
    prom = monitored.prom
    rates = wait_until(lambda: (lambda r: r if set(r) == {"0", "1"} and min(r.values()) > 0 else None)(
        _per_rank(prom, f"worker:alexray_train_images:rate1m{{{SEL}}}")), 240, "images/s of both ranks",
        monitored.proc, _driver_log)
    assert all(v > 0 for v in rates.values()), rates
    # the two workers live under two different raylets: two nodes
    workers = ray_train_pids(monitored.cluster)
    assert len(workers) == 2 and len({_parent(p) for p in workers}) == 2, workers
    entries = json.loads((monitored.targets / f"{RUN}.json").read_text())
    assert sorted(e["labels"]["rank"] for e in entries) == ["0", "1"]
    assert len({e["targets"][0] for e in entries}) == 2
    up = prom.scalar_by(f'up{{job="alexray", {SEL}}}', "rank")
    assert up == {"0": 1.0, "1": 1.0}
    ratio = wait_until(lambda: prom.query(f"run:alexray_train_data_wait:ratio_rate1m{{{SEL}}}"), 30, "data-wait ratio")
    value = float(ratio[0]["value"][1])
    assert 0.0 <= value <= 1.0, value
    per_worker = _per_rank(prom, f"worker:alexray_train_data_wait:ratio_rate1m{{{SEL}}}")
    assert set(per_worker) == {"0", "1"} and all(0.0 <= v <= 1.0 for v in per_worker.values()), per_worker


def test_labels_stay_bounded_while_the_run_goes_on(monitored):
    prom = monitored.prom

    def series():
        found = prom.series('{__name__=~"alexray_.+", job="alexray"}', start=time.time() - 5)
        return {tuple(sorted(s.items())) for s in found}

    before = series()
    step_before = max(prom.scalar_by(f"alexray_train_step{{{SEL}}}", "rank").values())
    wait_until(lambda: max(prom.scalar_by(f"alexray_train_step{{{SEL}}}", "rank").values()) >= step_before + 6, 120,
               "six more steps", monitored.proc, _driver_log)
    after = series()
    new = {dict(s)["__name__"] for s in after - before}
    assert new <= {"alexray_eval_top1_ratio", "alexray_eval_top5_ratio"}, after - before  # first evaluation only
    for labels in map(dict, after):
        assert set(labels) <= {"__name__", "job", "instance", "run", "rank", "node", "le", "phase", "category"}, labels
        assert labels.get("category", "productive") in CATEGORIES, labels  # nine at most
        assert labels["run"] == RUN and labels["rank"] in ("0", "1") and labels["node"] in _nodes(monitored), labels
        assert labels["instance"] == f"{RUN}/{labels['rank']}", labels
    assert len(after) < 150


def test_watch_shows_every_worker(monitored):
    from tests.shardtools import run_alexray

    for args in ([RUN], []):  # by run name, and the newest run when none is given
        done = run_alexray("watch", *args, "--once", "--prometheus", monitored.prom.url, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"run {RUN}" in done.stdout
        rows = {m.group(1): float(m.group(2)) for m in
                re.finditer(r"^\s+(\d+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+ [kMGTP]?FLOP/s\s+[\d.]+%", done.stdout,
                            re.MULTILINE)}
        assert set(rows) == {"0", "1"} and all(v > 0 for v in rows.values()), done.stdout
        total = float(re.search(r"^total ([\d.]+) img/s", done.stdout, re.MULTILINE).group(1))
        assert abs(total - sum(rows.values())) < 0.2, done.stdout
        assert re.search(r"ETA \d+:\d\d:\d\d", done.stdout), done.stdout
        assert re.search(r"img/s   [\d.]+ [kMGTP]?FLOP/s   MFU [\d.]+%", done.stdout), done.stdout  # train.peak_tflops
        assert re.search(r"goodput \d+%", done.stdout) and re.search(r"^ +\d+% \|[PDCESLRXW ]+$", done.stdout,
                                                                      re.MULTILINE), done.stdout


def test_a_killed_worker_counts_a_restart_and_throughput_continues(monitored):
    prom = monitored.prom
    assert max(_per_rank(prom, f"alexray_worker_restarts_total{{{SEL}}}").values()) == 0
    killed_at = time.time()
    os.kill(ray_train_pids(monitored.cluster)[0], signal.SIGKILL)

    def restarted_and_training():
        restarts = _per_rank(prom, f"alexray_worker_restarts_total{{{SEL}}}")
        fresh = _per_rank(prom, f"rate(alexray_train_images_total{{{SEL}}}[5s])")
        return (restarts == {"0": 1.0, "1": 1.0} and set(fresh) == {"0", "1"} and min(fresh.values()) > 0
                and time.time() - killed_at > 5)

    wait_until(restarted_and_training, 180, "the restarted workers to train", monitored.proc, _driver_log)
    # the recording rule runs on Prometheus' own evaluation interval, after the scrape that saw the restart
    wait_until(lambda: list(prom.scalar_by(f"run:alexray_worker_restarts:max{{{SEL}}}", "").values()) == [1.0],
               60, "the recording rule to count the restart", monitored.proc, _driver_log)
    back_at = time.time()
    for rank in ("0", "1"):
        expr = f'worker:alexray_train_images:rate1m{{{SEL}, rank="{rank}"}}'
        series = prom.query_range(expr, killed_at - 20, back_at, 1)
        assert len(series) == 1, series  # one series: the restarted worker continues it
        points = [(float(t), float(v)) for t, v in series[0]["values"]]
        assert any(v > 0 for t, v in points if t < killed_at), points
        assert points[-1][1] > 0 and points[-1][0] > killed_at + 5, points
    recorded = prom.query_range(f"run:alexray_worker_restarts:max{{{SEL}}}", killed_at - 20, back_at, 1)
    values = [float(v) for _, v in recorded[0]["values"]]
    assert values[0] == 0 and values[-1] == 1, values
    # the restart's cost is in the run's account: the time from the kill to the first batch after it
    recovery = prom.scalar_by(f'sum(alexray_run_seconds_total{{{SEL}, category="recovery"}})', "")
    assert next(iter(recovery.values()), 0) > 0, recovery
    goodput = prom.scalar_by(f"run:alexray_goodput:ratio_rate5m{{{SEL}}}", "")
    assert 0 < next(iter(goodput.values()), 0) < 1, goodput
    firing = wait_until(lambda: [a for a in prom.alerts() if a["labels"]["alertname"] == "AlexrayWorkerRestarted"
                                 and a["labels"].get("run") == RUN and a["state"] == "firing"], 30, "the restart alert")
    assert firing


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is not installed: run 'make system-deps' (apt-get install chromium)"
    return found


@dataclass
class RenderedPage:
    dom: str
    shot: Path


@pytest.fixture(scope="module")
def dashboard_page(monitored, tmp_path_factory) -> RenderedPage:
    """The dashboard of the run after a first evaluation, as headless chromium renders it: its DOM and a
    screenshot (the tests that read it share one load)."""
    from orchestrator.monitor import start_dashboard

    prom = monitored.prom
    wait_until(lambda: prom.query(f"alexray_eval_top1_ratio{{{SEL}}}"), 120, "a first evaluation", monitored.proc,
               _driver_log)
    work = tmp_path_factory.mktemp("dashboard")
    server = start_dashboard(prom.url, run=RUN)
    try:
        common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  "--virtual-time-budget=6000", f"--user-data-dir={work / 'chromium'}"]
        dom = subprocess.run(common + ["--dump-dom", server.url], capture_output=True, text=True, timeout=120).stdout
        shot = monitored.root / "dashboard.png"
        subprocess.run(common + ["--window-size=1280,1100", f"--screenshot={shot}", server.url],
                       capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    if shot.exists():
        shutil.copy(shot, work / "dashboard.png")  # kept with the test's files for a look
    return RenderedPage(dom, shot)


def test_dashboard_page_plots_the_run_in_chromium(dashboard_page):
    dom, shot = dashboard_page.dom, dashboard_page.shot
    assert 'data-loaded="1"' in dom, dom[-2000:]
    charts = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
        r'data-figure="(\w+)" data-series="(\d+)" data-points="(\d+)"', dom)}
    assert set(charts) == {"images", "flops", "goodput", "data_wait", "step_time", "loss", "accuracy"}, charts
    for figure, (series, points) in charts.items():
        assert series >= 1 and points >= series, (figure, series, points)  # the page drops empty series
    images_series, images_points = charts["images"]
    assert images_series >= 3 and images_points > 3 * images_series  # the total and one line per rank, over time
    assert charts["goodput"][0] >= 3  # stacked: productive, start-up, data wait at least
    assert f"run {RUN}" in dom and "img/s" in dom and re.search(r"MFU \d+(\.\d+)?%", dom), dom[-2000:]
    assert "MFU n/a" not in dom  # train.peak_tflops gives the workers a peak
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FIGURE_UNITS = {"images": "img/s", "flops": "FLOP/s", "goodput": "%", "data_wait": "%", "step_time": "s",
                "loss": "", "accuracy": "%"}


def _rendered_charts(dom: str) -> dict[str, tuple[list, list]]:
    """Each chart's axis ticks as (x, y, label), and its legend as (colour, name, value), read from the DOM."""
    charts = {}
    for chart in re.finditer(r'<section [^>]*data-figure="(\w+)"[^>]*>(.*?)</section>', dom, re.DOTALL):
        ticks = [(float(x), float(y), label) for x, y, label in re.findall(
            r'<text class="tick" x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>', chart.group(2))]
        legend = [(colour, *text.rsplit(": ", 1)) for colour, text in re.findall(
            r'<span style="--c:(#[0-9a-f]{6})">([^<]*)</span>', chart.group(2))]
        charts[chart.group(1)] = (ticks, legend)
    return charts


def test_dashboard_axes_and_legends_read_in_si_units_in_order(dashboard_page):
    from tests.test_formatting import page_category_colors, parse_si

    charts = _rendered_charts(dashboard_page.dom)
    assert set(charts) == set(FIGURE_UNITS), charts
    for figure, (ticks, legend) in charts.items():
        unit = FIGURE_UNITS[figure]
        assert len(ticks) >= 3 and legend, (figure, ticks, legend)
        bottom_up = [parse_si(label, unit) for _, _, label in sorted(ticks, key=lambda t: -t[1])]
        assert bottom_up == sorted(set(bottom_up)), (figure, ticks)  # the higher on the axis, the larger
        for x, _, label in ticks:  # right-aligned at x: the label fits left of it, cut off by nothing
            assert x >= 5 * len(label), (figure, x, label)
        for _, name, value in legend:
            parse_si(value, unit)
    flops_ticks, flops_legend = charts["flops"]
    assert re.fullmatch(r"[\d.]+ [kMGTP]FLOP/s", min(flops_ticks, key=lambda t: t[1])[2]), flops_ticks
    values = {name: parse_si(value, "FLOP/s") for _, name, value in flops_legend}
    assert values["total"] > 0 and all(values["total"] >= v for v in values.values()), values
    assert all(re.fullmatch(r"[\d.]+k? img/s", label) for _, _, label in charts["images"][0]), charts["images"]
    colours = page_category_colors()
    goodput = charts["goodput"][1]
    assert {name for _, name, _ in goodput} <= set(colours), goodput
    assert all(colour == colours[name] for colour, name, _ in goodput), goodput  # by meaning, not by position


def _grafana_queries() -> list[tuple[str, str]]:
    board = json.loads((ROOT / "cluster" / "grafana" / "dashboards" / "alexray-throughput.json").read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
    queries += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    return queries


def _grafana_expr(expr: str) -> str:
    """What Grafana sends for the run variable set to our run and node set to All."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "5s")
            .replace("$run", RUN).replace("$node", ".*"))


def test_every_grafana_query_returns_data(monitored):
    prom = monitored.prom
    end = time.time()
    empty = []
    queries = _grafana_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        series = prom.query_range(_grafana_expr(expr), monitored.started, end, 2)  # an invalid query raises
        values = [float(v) for s in series for _, v in s["values"] if not math.isnan(float(v))]
        if not values:
            empty.append((title, expr))
    assert not empty, empty
    board = json.loads((ROOT / "cluster" / "grafana" / "dashboards" / "alexray-throughput.json").read_text())
    for variable in board["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
        expected = [RUN] if label == "run" else sorted(_nodes(monitored))
        assert prom.label_values(label, _grafana_expr(metric)) == expected, variable["name"]
