"""A wheel built from the checkout and installed apart from it, as ``pip install .`` does in
cluster/kuberay/Dockerfile: the files the code reads at run time must be in it, and found there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy("Prometheus's promtool, on the files of a wheel it builds and installs")

ROOT = Path(__file__).resolve().parent.parent

# Run by the installed code, with the wheel's folder first on the path and the venv's
# site-packages (the dependencies) last, its .pth files unread: the editable install of the
# checkout is one of them, and it must not be what is imported.
PROBE = """
import json, sys
target, site_packages, out = sys.argv[1:4]
sys.path.insert(0, target)
sys.path.append(site_packages)
import yaml
import cluster, orchestrator.prometheus as prometheus
config = prometheus.render_config(out + "/targets", None)
path = out + "/prometheus.yml"
with open(path, "w") as f:
    f.write(yaml.safe_dump(config, sort_keys=False))  # as start_prometheus writes it
print(json.dumps({"modules": [prometheus.__file__, cluster.__file__], "config": path,
                  "rule_files": config["rule_files"]}))
"""


def _copy_sources(dest: Path) -> None:
    """What the build reads: pyproject.toml, the readme and the packages it lists, without
    anything a build or an editable install left in the checkout."""
    dest.mkdir()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(ROOT / name, dest / name)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([*map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the wheel was installed into (``pip install --target``)."""
    work = tmp_path_factory.mktemp("packaging")
    _copy_sources(work / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", work / "wheel",
         work / "source", cwd=work)
    wheels = list((work / "wheel").glob("alexray-*.whl"))
    assert len(wheels) == 1, wheels
    _run(*pip, "install", "--no-deps", "--no-index", "-q", "--target", work / "site", wheels[0], cwd=work)
    return work / "site"


def test_the_installed_prometheus_files_are_found_and_accepted_by_promtool(installed, tmp_path):
    done = _run(sys.executable, "-I", "-S", "-c", PROBE, installed, sysconfig.get_paths()["purelib"], tmp_path,
                cwd=tmp_path)
    found = json.loads(done.stdout)
    for path in (*found["modules"], *found["rule_files"]):
        assert Path(path).is_relative_to(installed), f"{path} is not from the installed wheel in {installed}"
    assert [Path(p).name for p in found["rule_files"]] == ["recording.yml", "alerts.yml"]
    checked = _run("promtool", "check", "config", found["config"], cwd=tmp_path)
    for rules in found["rule_files"]:  # promtool checks the rule files the config names, too
        assert f"Checking {rules}" in checked.stdout, checked.stdout
    checked = _run("promtool", "check", "rules", *found["rule_files"], cwd=tmp_path)
    assert checked.stdout.count("SUCCESS:") == 2, checked.stdout
