"""Rules for the suite itself: ``make test-fast`` (``-m "not heavy"``) leaves out every test that
starts SeaweedFS, Ray, Prometheus or chromium, and every mark a test carries is one pytest knows.

A test is heavy by its own mark or by a fixture of ``HEAVY_FIXTURES`` (tests/conftest.py). What a test
starts is read from its source, the source of its module's functions that it calls, and the source of
the fixtures it uses: a service started deeper down is not seen.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from tests.conftest import COLLECTED, HEAVY_FIXTURES, heavy_fixture_reason

TESTS = Path(__file__).resolve().parent

# How the tests of this repository start a service, and which.
SERVICE_STARTS = {
    "SeaweedFS": r"\bS3Server\(",
    "a Ray cluster": r"\bstart_local_cluster\(|\bray\.init\(|\bCluster\(|[\"']ray[\"'],\s*[\"']start[\"']"
                     r"|\bstart_alexray\(\s*[\"']train[\"']",  # without --address, 'alexray train' starts one
    "Prometheus": r"\bstart_prometheus\(|--start-prometheus|[\"']promtool[\"']",
    "chromium": r"\bchromium\b",
    "the demo": r"\borchestrator\.demo\b",
}
_STARTS = {service: re.compile(pattern) for service, pattern in SERVICE_STARTS.items()}


class _Grab:
    """Keeps the items of a collection run."""

    def __init__(self):
        self.items: list[pytest.Item] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)


@pytest.fixture(scope="module")
def suite(pytestconfig: pytest.Config) -> list[pytest.Item]:
    """Every test of tests/: this session's collection when it read every test file, else a collection
    of tests/ in this process (no test runs)."""
    files = {path.name for path in TESTS.glob("test_*.py")}
    collected = pytestconfig.stash[COLLECTED]
    if {item.path.name for item in collected} >= files:
        return collected
    grab = _Grab()
    code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "-o", "addopts=", str(TESTS)],
                       plugins=[grab])
    assert code == pytest.ExitCode.OK and grab.items, f"collecting {TESTS} failed ({code!r})"
    return grab.items


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _fixture_functions(item: pytest.Item):
    """The functions of the fixtures ``item`` uses, directly or through other fixtures, that tests/ defines."""
    for definitions in getattr(item, "_fixtureinfo").name2fixturedefs.values():
        for definition in definitions:
            if getattr(definition.func, "__module__", "").startswith("tests."):
                yield definition.func


def _helpers(function):
    """The functions of ``function``'s module that it calls by name (one level: not their own helpers)."""
    module = inspect.getmodule(function)
    codes, names = [function.__code__], set()
    while codes:  # the function's own code and that of the lambdas and comprehensions in it
        code = codes.pop()
        names.update(code.co_names)
        codes += [const for const in code.co_consts if inspect.iscode(const)]
    for name in sorted(names):
        helper = getattr(module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == function.__module__:
            yield helper


def services_started(item: pytest.Item) -> dict[str, str]:
    """``{service: where}`` for each service ``item``'s own source, that of the module's functions it
    calls, or that of its fixtures starts."""
    places = [(item.function.__name__, _source(item.function))]
    places += [(f"helper {helper.__name__}", _source(helper)) for helper in _helpers(item.function)]
    places += [(f"fixture {function.__name__}", _source(function)) for function in _fixture_functions(item)]
    found: dict[str, str] = {}
    for where, source in places:
        for service, pattern in _STARTS.items():
            match = pattern.search(source)
            if match and service not in found:
                found[service] = f"{where}: {match.group(0)}"
    return found


def _heavy(item: pytest.Item) -> bool:
    return item.get_closest_marker("heavy") is not None


def test_a_test_using_a_heavy_fixture_is_heavy(suite):
    using = [item for item in suite if heavy_fixture_reason(item) is not None]
    assert using, f"no test uses any of {sorted(HEAVY_FIXTURES)}: the fixture names are stale"
    assert [item.nodeid for item in using if not _heavy(item)] == []


def test_a_test_that_starts_a_service_is_heavy(suite):
    # this module's probes name the calls without making them
    starting = [(item, services_started(item)) for item in suite if item.module.__name__ != __name__]
    starting = [(item, found) for item, found in starting if found]
    assert len(starting) >= len(SERVICE_STARTS), f"the telltales find almost nothing: {starting}"
    light = {item.nodeid: found for item, found in starting if not _heavy(item)}
    assert light == {}, "these start a service but are not marked heavy (@pytest.mark.heavy(\"reason\"))"


def test_every_service_a_telltale_names_is_started_by_some_test(suite):
    """A telltale that matches nothing no longer says how the tests start that service."""
    seen = {service for item in suite if item.module.__name__ != __name__ for service in services_started(item)}
    assert seen == set(SERVICE_STARTS)


def _starting():  # read by the next test, never run
    S3Server(Path("x"))  # noqa: F821
    start_local_cluster(num_cpus=1)  # noqa: F821
    subprocess.run(["promtool", "check", "config"])  # noqa: F821
    subprocess.run([sys.executable, "-m", "orchestrator.demo"])  # noqa: F821
    shutil.which("chromium")  # noqa: F821


def _not_starting():  # read by the next test, never run
    start_alexray("shard", "src", "dest")  # noqa: F821 - sharding on this machine: no cluster
    run_alexray("train", "spec.yaml", "--no-ray")  # noqa: F821
    S3Server.__doc__  # noqa: B018, F821 - named, not started


def test_the_telltales_find_the_calls_they_are_for():
    class Probe:  # a test item of no fixtures
        function = _starting
        _fixtureinfo = type("FixtureInfo", (), {"name2fixturedefs": {}})()

    assert set(services_started(Probe())) == set(SERVICE_STARTS)
    Probe.function = _not_starting
    assert services_started(Probe()) == {}


def test_a_heavy_mark_says_why(suite):
    marks = [(item.nodeid, mark) for item in suite for mark in item.iter_markers("heavy")]
    assert marks, "no test is heavy"
    assert [node for node, mark in marks if not (len(mark.args) == 1 and isinstance(mark.args[0], str)
                                                and mark.args[0].strip())] == []


def test_no_test_uses_an_unregistered_marker(suite, pytestconfig):
    registered = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"heavy", "parametrize", "skipif"} <= registered
    unknown = {(item.nodeid, mark.name) for item in suite for mark in item.iter_markers()
               if mark.name not in registered}
    assert unknown == set()


def test_the_heavy_and_light_tests_split_this_sessions_collection(request):
    """``-m`` selects from every collected test: what it keeps and what it leaves out add up to the
    collection, and under ``-m "not heavy"`` what it leaves out is exactly the heavy tests (a heavy
    mark added after ``-m`` had selected would leave a heavy test in)."""
    collected = request.config.stash[COLLECTED]
    heavy = {item.nodeid for item in collected if _heavy(item)}
    light = {item.nodeid for item in collected if not _heavy(item)}
    assert len(heavy) + len(light) == len(collected) and not heavy & light
    selected = {item.nodeid for item in request.session.items}
    assert request.node.nodeid in selected and selected <= heavy | light
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return  # -p no:terminal: the deselected tests are not counted
    deselected = {item.nodeid for item in reporter.stats.get("deselected", [])}
    assert selected | deselected == heavy | light and not selected & deselected
    if request.config.option.markexpr == "not heavy":
        assert selected <= light and deselected >= heavy
