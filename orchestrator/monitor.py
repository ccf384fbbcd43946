"""``alexray watch [JOB]`` (a live terminal view) and ``alexray dashboard`` (a local web page), both
reading a run's figures from Prometheus: images/s per worker and in total, data-wait, step time,
loss, accuracy, restarts and the ETA.

A JOB is a run name that Prometheus holds, else a job id or run name looked up through Ray's Jobs
API (``--address``); without one, the run that reported most recently. The dashboard's server
builds every query itself from the run name, so the page cannot send Prometheus arbitrary queries,
and answers only requests whose Host header is a loopback name or the address it is bound to: a
web page elsewhere cannot rebind its own name to 127.0.0.1 and read the dashboard (DNS rebinding).
No torch is imported here.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from alexray_core.errors import AlexrayError
from alexray_core.goodput import CATEGORIES

from . import jobs
from .follow import format_flops
from .prometheus import Prometheus, PrometheusError
from .rayclient import JobError

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"


class MonitorError(AlexrayError):
    """A problem the user can fix; the message names it and the fix, on one line."""


class Queries:
    """The PromQL of one run's figures, written once for the dashboard and for ``watch``."""

    def __init__(self, run: str, window: str):
        self.s = 'run="' + run.replace("\\", "\\\\").replace('"', '\\"') + '"'
        self.w = window

    def rate(self, metric: str, agg: str = "sum") -> str:
        return f"{agg}(rate({metric}{{{self.s}}}[{self.w}]))"

    def images(self, by: str = "") -> str:
        return self.rate("alexray_train_images_total", f"sum {by}".strip())

    def data_wait(self, by: str = "") -> str:
        """The fraction of step time spent waiting for data."""
        agg = f"sum {by}".strip()
        return (f"{self.rate('alexray_train_data_wait_seconds_total', agg)}"
                f" / {self.rate('alexray_train_step_duration_seconds_sum', agg)}")

    def step_quantile(self, q: float) -> str:
        return f"histogram_quantile({q}, {self.rate('alexray_train_step_duration_seconds_bucket', 'sum by (le)')})"

    def gauge(self, metric: str, agg: str = "max") -> str:
        return f"{agg}({metric}{{{self.s}}})"

    def time_shares(self) -> str:
        """Each category's share of the run's slot-seconds (alexray_core.goodput): they add up to 1."""
        return (f"{self.rate('alexray_run_seconds_total', 'sum by (category)')}"
                f" / scalar({self.rate('alexray_run_seconds_total')})")

    def flops(self, by: str = "") -> str:
        """Model FLOP/s: each worker's images/s times the FLOPs of one of its samples."""
        per_worker = (f"sum by (rank) (rate(alexray_train_images_total{{{self.s}}}[{self.w}]))"
                      f" * on (rank) max by (rank) (alexray_model_flops_per_sample{{{self.s}}})")
        return f"sum {by} ({per_worker})".replace("sum  (", "sum (")

    def mfu(self) -> str:
        """FLOP/s over the workers' dense peak; no value where no peak is known."""
        return f"{self.flops()} / {self.gauge('alexray_device_peak_flops', 'sum')}"


def figures(run: str, window: str) -> list[dict]:
    """The dashboard's charts: id, title, unit and (legend template, PromQL) pairs."""
    q = Queries(run, window)
    return [
        {"id": "images", "title": "Images per second", "unit": "img/s", "queries": [
            ("total", q.images()), ("rank {rank}", q.images("by (rank)"))]},
        {"id": "flops", "title": "Model FLOP/s", "unit": "FLOP/s", "queries": [
            ("total", q.flops()), ("rank {rank}", q.flops("by (rank)"))]},
        {"id": "goodput", "title": "Where the workers' time goes", "unit": "%", "stacked": True, "queries": [
            ("{category}", q.time_shares())]},
        {"id": "data_wait", "title": "Data-wait fraction", "unit": "%", "queries": [
            ("rank {rank}", q.data_wait("by (rank)"))]},
        {"id": "step_time", "title": "Step time", "unit": "s", "queries": [
            ("p50", q.step_quantile(0.5)), ("p95", q.step_quantile(0.95))]},
        {"id": "loss", "title": "Training loss", "unit": "", "queries": [
            ("rank {rank}", q.gauge("alexray_train_loss", "max by (rank)"))]},
        {"id": "accuracy", "title": "Validation accuracy", "unit": "%", "queries": [
            ("top-1", q.gauge("alexray_eval_top1_ratio")), ("top-5", q.gauge("alexray_eval_top5_ratio"))]},
    ]


def _legend(template: str, metric: dict) -> str:
    try:
        return template.format(**metric)
    except KeyError:
        return template


def figure_data(prom: Prometheus, run: str, minutes: float, window: str) -> list[dict]:
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    out = []
    for figure in figures(run, window):
        series = []
        for legend, expr in figure["queries"]:
            for item in prom.query_range(expr, start, end, step):
                points = [[float(t), float(v)] for t, v in item["values"] if not math.isnan(float(v))]
                series.append({"name": _legend(legend, item["metric"]), "points": points})
        if figure.get("stacked"):  # bottom to top in the categories' order, productive first
            series.sort(key=lambda s: CATEGORIES.index(s["name"]) if s["name"] in CATEGORIES else len(CATEGORIES))
        out.append({"id": figure["id"], "title": figure["title"], "unit": figure["unit"],
                    "stacked": bool(figure.get("stacked")), "series": series})
    return out


# --- which run -----------------------------------------------------------------------------------

def newest_run(prom: Prometheus) -> str | None:
    fresh = prom.scalar_by("max by (run) (timestamp(alexray_train_step))", "run")
    return max(fresh, key=fresh.get) if fresh else None


def resolve_run(prom: Prometheus, job: str | None, address: str | None = None, insecure: bool = False) -> str:
    if job is None:
        run = newest_run(prom)
        if run is None:
            raise MonitorError(f"Prometheus at {prom.url} has no recent alexray training metrics: start a job "
                               "('alexray submit'), or check that this Prometheus reads the targets directory "
                               "(README, Metrics)")
        return run
    if job in prom.label_values("run", "alexray_train_step"):
        return job
    try:
        found = jobs.status(address, job, insecure=insecure)
    except JobError as e:
        raise MonitorError(f"no run named {job!r} has metrics in Prometheus at {prom.url}, and looking it up as a "
                           f"job failed: {e}") from None
    if not found.get("run_name"):
        raise MonitorError(f"job {job!r} is not an alexray training job; pass a run name or an 'alexray submit' job")
    return found["run_name"]


# --- the figures of one moment ----------------------------------------------------------------

def _by(prom: Prometheus, expr: str, label: str, at: float | None) -> dict[str, float]:
    """``{label value: number}`` of an instant vector at ``at`` (None: now), NaN dropped."""
    out = {}
    for item in prom.query(expr, at):
        value = float(item["value"][1])
        if not math.isnan(value):
            out[item["metric"].get(label, "")] = value
    return out


def last_report(prom: Prometheus, run: str, lookback_s: float, now: float) -> float | None:
    """When Prometheus last scraped the run's step, looking back ``lookback_s`` from ``now``; None: not then.

    Once a run's targets are gone its series are marked stale and instant queries find nothing, and
    Prometheus 2 has no function for the time of a range's last sample: a subquery of ``timestamp()``
    finds a sample within one of its steps of the last, and the raw samples since then give the last.
    """
    sel = f"alexray_train_step{{{Queries(run, '1m').s}}}"
    step = max(1, math.ceil(lookback_s / 300))
    coarse = _by(prom, f"max(max_over_time(timestamp({sel})[{math.ceil(lookback_s)}s:{step}s]))", "", now)
    if not coarse:
        return None
    found = coarse[""]
    raw = prom.query(f"{sel}[{math.ceil(now - found) + 1}s]", now)
    return max((float(t) for item in raw for t, _ in item["values"]), default=found)


def _ago(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds // 60 % 60} min"


def snapshot(prom: Prometheus, run: str, window: str = "30s", lookback_s: float = 3600.0) -> dict:
    """Everything ``watch`` shows, as numbers (None where Prometheus has no value).

    A run that no longer reports (ended, or its workers gone) is shown as its last report within
    ``lookback_s`` left it. ``state``: ``running`` while it reports, ``finished`` once its step reached
    the planned steps, ``stopped`` when it stopped reporting before that, ``none`` without a report
    in ``lookback_s``; ``status`` says it in words for the summary line (None while running).
    """
    q = Queries(run, window)
    now = time.time()
    newest = _by(prom, f"max(timestamp(alexray_train_step{{{q.s}}}))", "", None)
    last = newest[""] if newest else last_report(prom, run, lookback_s, now)
    at = last if not newest and last is not None else None  # ended: every figure as of its last scrape

    def one(expr: str):
        return next(iter(_by(prom, expr, "", at).values()), None)

    images = prom.query(q.images("by (rank, node)"), at)
    wait = _by(prom, q.data_wait("by (rank)"), "rank", at)
    loss = _by(prom, q.gauge("alexray_train_loss", "max by (rank)"), "rank", at)
    workers = sorted(({"rank": item["metric"].get("rank", "?"), "node": item["metric"].get("node", "?"),
                       "images_per_s": float(item["value"][1])} for item in images),
                     key=lambda x: int(x["rank"]) if x["rank"].isdigit() else 0)
    flops = _by(prom, q.flops("by (rank)"), "rank", at)
    for worker in workers:
        worker["data_wait"] = wait.get(worker["rank"])
        worker["loss"] = loss.get(worker["rank"])
        worker["flops_per_s"] = flops.get(worker["rank"])
    step, planned = one(q.gauge("alexray_train_step")), one(q.gauge("alexray_train_steps_planned"))
    steps_per_s = one(q.rate("alexray_train_step_duration_seconds_count", "max"))
    if last is None:
        state, status = "none", f"no report in the last {_ago(lookback_s)}"
    elif step is not None and planned and step >= planned:
        state, status = "finished", "finished"
    elif newest:
        state, status = "running", None
    else:
        state, status = "stopped", f"last report {_ago(now - last)} ago"
    eta = None
    if state == "running" and step is not None and planned and steps_per_s and steps_per_s > 0:
        eta = max(0.0, planned - step) / steps_per_s
    return {
        "run": run, "time": now, "state": state, "status": status, "last_report": last, "workers": workers,
        "images_per_s": sum(x["images_per_s"] for x in workers) if workers else None,
        "data_wait": one(q.data_wait()), "step": step, "planned_steps": planned, "steps_per_s": steps_per_s,
        "eta_s": eta, "epoch": one(q.gauge("alexray_train_epoch")), "lr": one(q.gauge("alexray_train_learning_rate")),
        "loss": one(q.gauge("alexray_train_loss", "avg")), "top1": one(q.gauge("alexray_eval_top1_ratio")),
        "top5": one(q.gauge("alexray_eval_top5_ratio")),
        "restarts": one(q.gauge("alexray_worker_restarts_total")),
        "step_p50": one(q.step_quantile(0.5)), "step_p95": one(q.step_quantile(0.95)),
        "flops_per_s": one(q.flops()), "mfu": one(q.mfu()),
        "peak_flops": one(q.gauge("alexray_device_peak_flops", "sum")),
        "goodput_history": goodput_history(prom, q, (last if at else now) - HISTORY_S, last if at else now),
    }


HISTORY_S, HISTORY_COLUMNS = 600, 60  # watch's goodput plot: the last 10 minutes, a column per 10 s


def goodput_history(prom: Prometheus, q: Queries, start: float, end: float) -> list[dict]:
    """The categories' shares of the workers' time, a ``{category: share}`` per column, oldest first."""
    columns: dict[float, dict] = {}
    for item in prom.query_range(q.time_shares(), start, end, HISTORY_S / HISTORY_COLUMNS):
        for t, v in item["values"]:
            if not math.isnan(float(v)):
                columns.setdefault(float(t), {})[item["metric"].get("category", "?")] = float(v)
    return [columns[t] for t in sorted(columns)]


# One letter per category for watch's plot, in CATEGORIES' order (bottom to top).
LETTERS = dict(zip(CATEGORIES, "PDCESLRXW"))


def plot_goodput(history: list[dict], height: int = 5) -> list[str]:
    """A stacked plot in text: a column per moment, each row a 1/height band of the workers' time,
    filled with the letter of the category covering the band's middle."""
    if not history:
        return ["goodput: no samples yet"]
    rows = []
    for row in range(height, 0, -1):
        middle, line = (row - 0.5) / height, ""
        for shares in history:
            total, letter = 0.0, " "
            for category in CATEGORIES:
                total += shares.get(category, 0.0)
                if total >= middle:
                    letter = LETTERS[category]
                    break
            line += letter
        rows.append(f"{100 * row // height:>4}% |{line}")
    last = history[-1]
    rows.append("      " + "  ".join(f"{LETTERS[c]} {c.replace('_', ' ')} {100 * last.get(c, 0.0):.0f}%"
                                    for c in CATEGORIES if last.get(c, 0.0) >= 0.005))
    return rows


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _pct(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


# MFU where the workers report no peak FLOP/s (a CPU, a GPU workers/flops.py does not know): said so,
# with the setting that gives one, rather than a '-' that reads as "not measured yet". The page says the same.
NO_PEAK = "n/a (no peak for this device: set train.peak_tflops)"


def _mfu(snap: dict) -> str:
    if snap.get("mfu") is None and not snap.get("peak_flops"):
        return NO_PEAK
    return _pct(snap.get("mfu"))


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(snap: dict, prom_url: str) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    lines = [f"alexray watch   run {snap['run']}   {clock}   (Prometheus {prom_url})"]
    if snap["state"] == "none":
        lines.append(f"{snap['status']} for this run: it has not started yet, or ended before that")
        return "\n".join(lines) + "\n"
    step = f"{_num(snap['step'], '.0f')}/{_num(snap['planned_steps'], '.0f')}"
    lines.append(f"epoch {_num(snap['epoch'], '.0f')}   step {step}   loss {_num(snap['loss'], '.4f')}   "
                 f"lr {_num(snap['lr'], '.3g')}   top-1 {_pct(snap['top1'])}   top-5 {_pct(snap['top5'])}   "
                 f"restarts {_num(snap['restarts'], '.0f')}   {snap['status'] or 'ETA ' + _duration(snap['eta_s'])}")
    lines.append(f"total {_num(snap['images_per_s'], '.1f')} img/s   {format_flops(snap.get('flops_per_s'))}   "
                 f"MFU {_mfu(snap)}   data-wait {_pct(snap['data_wait'])}   "
                 f"step p50 {_num(snap['step_p50'], '.3f')} s   p95 {_num(snap['step_p95'], '.3f')} s")
    lines.append("")
    lines.append(f"{'rank':>4}  {'node':<16} {'img/s':>9} {'FLOP/s':>14} {'data-wait':>10} {'loss':>9}")
    for w in snap["workers"]:
        lines.append(f"{w['rank']:>4}  {w['node']:<16} {w['images_per_s']:>9.1f} {format_flops(w.get('flops_per_s')):>14} "
                     f"{_pct(w['data_wait']):>10} {_num(w['loss'], '.4f'):>9}")
    history = snap.get("goodput_history") or []
    if history:
        lines.append("")
        goodput = history[-1].get("productive", 0.0)
        lines.append(f"where the workers' time goes (last {HISTORY_S // 60} min, a column per "
                     f"{HISTORY_S // HISTORY_COLUMNS} s): goodput {100 * goodput:.0f}%")
        lines.extend(plot_goodput(history))
    return "\n".join(lines) + "\n"


def watch(prom: Prometheus, run: str, interval: float = 1.0, once: bool = False, window: str = "30s",
          out=None) -> int:
    out = out or sys.stdout
    while True:
        frame = render(snapshot(prom, run, window), prom.url)
        if once:
            out.write(frame)
            out.flush()
            return 0
        out.write("\x1b[H\x1b[2J" + frame)  # home, clear: redraw in place
        out.flush()
        time.sleep(interval)


# --- the web page --------------------------------------------------------------------------------

@dataclass
class DashboardServer:
    url: str
    server: ThreadingHTTPServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_WILDCARDS = ("", "0.0.0.0", "::")


def _host_name(header: str) -> str | None:
    """The name of a Host header without its port, lower case; None when it is malformed."""
    host = header.strip().lower()
    if host.startswith("["):  # [v6]:port
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = host.rpartition(":")
    if not colon:
        return host.rstrip(".")
    if ":" in name or not port.isdigit():
        return None
    return name.rstrip(".")


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host header names this server: a loopback name, or the bound address.

    A server on a wildcard address also answers this machine's host names and any IP literal: a
    rebinding attack needs a name of its own, and a literal address cannot be rebound.
    """
    name = _host_name(header or "")
    if not name:
        return False
    address = _ip(name)
    if name == "localhost" or (address is not None and address.is_loopback):
        return True
    bound = bound.strip("[]").lower()
    if name == bound or (address is not None and address == _ip(bound)):
        return True
    if bound in _WILDCARDS:
        return address is not None or name in {socket.gethostname().lower(), socket.getfqdn().lower()}
    return False


def _handler(prom: Prometheus, default_run: str | None, window: str, bound: str = "127.0.0.1"):
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per request would drown the terminal
            pass

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data) -> None:
            self._send(code, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not host_allowed(self.headers.get("Host"), bound):
                shown = "127.0.0.1" if bound in _WILDCARDS else bound
                return self._json(421, {"error": f"Host {self.headers.get('Host')!r} is not this dashboard's "
                                                 f"address; open http://{shown}:{self.server.server_address[1]}/"})
            parts = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(parts.query))
            try:
                if parts.path in ("/", "/index.html"):
                    return self._send(200, page, "text/html; charset=utf-8")
                if parts.path == "/api/runs":
                    runs = sorted(prom.label_values("run", "alexray_train_step"))
                    return self._json(200, {"runs": runs, "default": default_run or newest_run(prom),
                                            "prometheus": prom.url})
                if parts.path == "/api/figures":
                    run = params.get("run") or default_run or newest_run(prom)
                    if not run:
                        return self._json(200, {"run": None, "figures": [], "summary": None})
                    minutes = min(24 * 60.0, max(1.0, float(params.get("minutes", 15))))
                    return self._json(200, {"run": run, "figures": figure_data(prom, run, minutes, window),
                                            "summary": snapshot(prom, run, window, minutes * 60)})
                return self._json(404, {"error": f"no such page {parts.path}"})
            except PrometheusError as e:
                return self._json(502, {"error": str(e)})
            except ValueError as e:
                return self._json(400, {"error": str(e)})

    return Handler


def start_dashboard(prometheus_url: str | None = None, host: str = "127.0.0.1", port: int = 0,
                    run: str | None = None, window: str = "30s") -> DashboardServer:
    """Serve the dashboard page on a thread; ``url`` is where to open it, ``stop()`` ends it."""
    prom = Prometheus(prometheus_url)
    server = ThreadingHTTPServer((host, port), _handler(prom, run, window, host))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="alexray-dashboard", daemon=True)
    thread.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return DashboardServer(f"http://{shown}:{server.server_address[1]}/", server, thread)


# --- command line -----------------------------------------------------------------------------

def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"alexray {command}")
    p.add_argument("--prometheus", default=None, metavar="URL",
                   help="Prometheus to read (default: ALEXRAY_PROMETHEUS_URL, else http://127.0.0.1:9090)")
    p.add_argument("--window", default="30s", help="rate window, a PromQL duration (default 30s)")
    if command == "watch":
        p.add_argument("job", nargs="?", metavar="JOB", help="run name or job id (default: the newest run)")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
        p.add_argument("--once", action="store_true", help="print one view and exit")
        p.add_argument("--address", default=None, help="Ray Jobs API, to look up a job id (see 'alexray status')")
        p.add_argument("--insecure", action="store_true", help="allow plain http to a remote Jobs API")
    else:
        p.add_argument("--run", default=None, help="run shown first (default: the newest)")
        p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=8765, help="port to serve on (default 8765; 0: any)")
        p.add_argument("--start-prometheus", action="store_true",
                       help="start a local Prometheus with cluster/prometheus/ (needs Debian's prometheus)")
        p.add_argument("--prometheus-dir", default=None,
                       help="data directory of the started Prometheus (default ~/.cache/alexray/prometheus)")
    return p


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    started = None
    try:
        if command == "watch":
            prom = Prometheus(args.prometheus)
            prom.check()
            run = resolve_run(prom, args.job, args.address, args.insecure)
            try:
                return watch(prom, run, args.interval, args.once, args.window)
            except KeyboardInterrupt:
                return 0
        url = args.prometheus
        if args.start_prometheus:
            from .prometheus import start_prometheus

            workdir = Path(args.prometheus_dir or Path.home() / ".cache" / "alexray" / "prometheus")
            started = start_prometheus(workdir)
            url = started.url
            print(f"Prometheus: {url} (data in {workdir})", flush=True)
        Prometheus(url).check()
        try:
            server = start_dashboard(url, args.host, args.port, args.run, args.window)
        except OSError as e:
            raise MonitorError(f"cannot serve on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
        print(f"dashboard: {server.url}  (Ctrl-C to stop)", flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            server.stop()
        return 0
    except AlexrayError as e:
        print(f"alexray {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # while Prometheus was starting: it is stopped already
        print(f"alexray {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if started is not None:
            started.stop()
