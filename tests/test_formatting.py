"""How figures are written, without services: the terminal's SI formatter (``orchestrator.follow``)
and the dashboard page's (``fmt`` and its axis ``ticks``, run in headless chromium) hold to
one table of cases, and MFU without a peak says so in ``watch`` and on the page alike."""

from __future__ import annotations

import colorsys
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alexray_core.goodput import CATEGORIES
from orchestrator.follow import format_flops, format_si
from orchestrator.monitor import NO_PEAK, render

PAGE = Path(__file__).resolve().parent.parent / "orchestrator" / "static" / "dashboard.html"

CASES = [  # value, unit, as both formatters write it
    (8574172745, "FLOP/s", "8.6 GFLOP/s"),
    (8.1e9, "FLOP/s", "8.1 GFLOP/s"),
    (1.23e12, "FLOP/s", "1.2 TFLOP/s"),
    (512e6, "FLOP/s", "512 MFLOP/s"),
    (2e9, "FLOP/s", "2 GFLOP/s"),
    (3.2e15, "FLOP/s", "3.2 PFLOP/s"),
    (0, "FLOP/s", "0 FLOP/s"),
    (1234.5, "img/s", "1.2k img/s"),
    (1500, "img/s", "1.5k img/s"),
    (-1500, "img/s", "-1.5k img/s"),
    (610, "img/s", "610 img/s"),
    (96.3, "img/s", "96.3 img/s"),
    (2.5e6, "img/s", "2.5M img/s"),
    (0.15, "s", "150 ms"),
    (2.5, "s", "2.5 s"),
    (4.2e-5, "s", "42 µs"),
    (0, "s", "0 s"),
    (512 * 2 ** 20, "B", "512 MiB"),
    (3 * 2 ** 30, "B/s", "3 GiB/s"),
    (100, "B", "100 B"),
    (0.4123, "", "0.412"),
    (2.3026, "", "2.3"),
    (1.9734, "", "1.97"),
    (12.345, "", "12.3"),
    (1234.5, "", "1.23k"),
    (0.05, "", "0.05"),
    (None, "FLOP/s", "-"),
    (math.nan, "img/s", "-"),
]

SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "m": 1e-3, "µ": 1e-6, "n": 1e-9,
         "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50}


def parse_si(label: str, unit: str) -> float:
    """The number an SI label stands for, the label's unit being ``unit``; fails on any other form."""
    if unit == "%":
        found = re.fullmatch(r"(-?[\d.]+)%", label)
        assert found, (label, unit)
        return float(found.group(1)) / 100
    prefixes = "Pi|Ti|Gi|Mi|Ki|[kMGTPmµn]"
    form = rf"(-?[\d.]+) ({prefixes})?{re.escape(unit)}" if unit in ("FLOP/s", "s", "B", "B/s") else \
        rf"(-?[\d.]+)({prefixes})?" + (f" {re.escape(unit)}" if unit else "")
    found = re.fullmatch(form, label)
    assert found, (label, unit)
    return float(found.group(1)) * SCALE[found.group(2) or ""]


def test_the_terminal_writes_figures_with_si_prefixes_and_their_unit():
    wrong = [(v, u, format_si(v, u), want) for v, u, want in CASES if format_si(v, u) != want]
    assert not wrong, wrong
    assert format_flops(1.23e12) == "1.2 TFLOP/s" and format_flops(None) == "-" and format_flops(math.nan) == "-"
    for value, unit, want in CASES:
        if want != "-" and value:
            assert math.isclose(parse_si(want, unit), value, rel_tol=0.05), (value, want)


def _page_function(name: str) -> str:
    """The source of the page's top-level ``function name``, up to its closing brace."""
    found = re.search(rf"^function {name}\(.*?^}}$", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    assert found, f"no function {name} in {PAGE}"
    return found.group(0)


def _run_page(tmp_path: Path, expression: str, *functions: str):
    """What the page's ``functions`` make of a JavaScript ``expression``, through JSON, as headless
    chromium (the browser the dashboard test renders the page in) runs them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed: run 'make system-deps' (apt-get install chromium)"
    script = "\n".join(map(_page_function, functions))
    page = tmp_path / "page-functions.html"
    page.write_text(f"<html><body><pre id=out></pre><script>\n{script}\n"
                    f"document.getElementById('out').textContent = JSON.stringify({expression});\n"
                    "</script></body></html>")
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", done.stdout, re.DOTALL)
    assert found and found.group(1), f"the page's script wrote nothing:\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.heavy("chromium")
def test_the_page_writes_figures_as_the_terminal_does(tmp_path):
    cases = ",".join(f"[{json.dumps(v)}, {json.dumps(u)}]" for v, u, _ in CASES)  # NaN: a JavaScript literal
    got = _run_page(tmp_path, f"[{cases}].map(([v, u]) => fmt(v, u))", "prefixOf", "fmt")
    wrong = [(v, u, g, want) for (v, u, want), g in zip(CASES, got) if g != want]
    assert not wrong, wrong


RANGES = [(0, 8628139520, "FLOP/s"), (0, 1263.7, "img/s"), (0, 1, "%"), (0, 0.21, "s"), (0, 2.3026, ""),
          (-0.3, 1.7, ""), (0, 1e-3, "s"), (0, 7.2e15, "FLOP/s"), (0, 3 * 2 ** 30, "B"), (0, 1, "")]


@pytest.mark.heavy("chromium")
def test_the_page_labels_its_axes_with_round_values_in_order(tmp_path):
    ranges = json.dumps([[lo, hi, unit] for lo, hi, unit in RANGES])
    got = _run_page(tmp_path, f"{ranges}.map(([lo, hi, unit]) => ticks(lo, hi, unit).map((v) => [v, fmt(v, unit)]))",
                    "prefixOf", "fmt", "ticks")
    for (lo, hi, unit), marks in zip(RANGES, got):
        values, labels = [v for v, _ in marks], [text for _, text in marks]
        assert 3 <= len(values) <= 7 and values[0] <= lo and values[-1] >= hi, (lo, hi, marks)
        steps = {round(b - a, 12) for a, b in zip(values, values[1:])}
        assert len(steps) == 1 and steps.pop() > 0, marks  # evenly spaced, upwards
        assert len(set(labels)) == len(labels), marks
        read = [parse_si(text, unit) for text in labels]
        assert read == sorted(read) and all(math.isclose(r, v, rel_tol=1e-9, abs_tol=1e-12)
                                            for r, v in zip(read, values)), marks


def _snapshot(**figures) -> dict:
    snap = {"run": "r", "time": 0.0, "state": "running", "status": None, "step": 10, "planned_steps": 100,
            "epoch": 1, "loss": 0.5, "lr": 0.01, "top1": None, "top5": None, "restarts": 0, "eta_s": 60,
            "images_per_s": 300.0, "flops_per_s": 8.1e9, "mfu": None, "peak_flops": None, "data_wait": 0.1,
            "step_p50": 0.1, "step_p95": 0.2, "workers": [], "goodput_history": []}
    return {**snap, **figures}


def test_watch_says_why_there_is_no_mfu_only_when_no_peak_is_known():
    assert "   MFU n/a (no peak for this device: set train.peak_tflops)   data-wait 10.0%" in render(_snapshot(), "u")
    assert "   MFU -   data-wait" in render(_snapshot(peak_flops=5e13), "u")  # a peak, no FLOP/s yet
    assert "   MFU 16.2%   " in render(_snapshot(mfu=0.162, peak_flops=5e13), "u")
    assert "8.1 GFLOP/s   MFU" in render(_snapshot(), "u")
    page = re.search(r'^const NO_PEAK = (".*");$', PAGE.read_text(), re.MULTILINE)
    assert page and json.loads(page.group(1)) == NO_PEAK  # the page says the same


def page_category_colors() -> dict[str, str]:
    """The page's table of goodput category -> colour."""
    found = re.search(r"^const CATEGORY_COLORS = (\{.*?\});$", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    assert found, "no CATEGORY_COLORS table in the page"
    return json.loads(found.group(1))


def _hue_saturation(color: str) -> tuple[float, float]:
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    hue, _, saturation = colorsys.rgb_to_hls(r, g, b)
    return hue * 360, saturation


def test_the_goodput_categories_are_coloured_by_meaning():
    colors = page_category_colors()
    assert list(colors) == list(CATEGORIES)

    def red(color):
        hue, saturation = _hue_saturation(color)
        return saturation > 0.4 and (hue < 12 or hue > 345)

    def green_or_blue(color):
        hue, saturation = _hue_saturation(color)
        return saturation > 0.3 and 90 <= hue <= 240

    def grey_or_amber(color):
        hue, saturation = _hue_saturation(color)
        return saturation < 0.12 or 25 <= hue <= 50

    assert green_or_blue(colors["productive"])
    for category in ("startup", "evaluation", "checkpoint_stall", "data_wait", "waiting_for_resources"):
        assert grey_or_amber(colors[category]) and not red(colors[category]), (category, colors[category])
    for category in ("lost_work", "recovery", "preemption"):
        assert red(colors[category]), (category, colors[category])
    assert len(set(colors.values())) == len(colors)
