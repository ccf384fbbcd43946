# alexray: make install | make test | make test-fast | make demo | make bench
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install system-deps deps-prometheus deps-chromium test test-fast demo bench clean

install: $(STAMP)

# Rebuilt only when the dependency list changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# A Debian package for a command that is missing: installed when run as root, else how to get it.
define apt_need
	@if ! command -v $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	  else \
	    echo "$(1) is missing: run 'sudo apt-get install $(2)' (Debian/Ubuntu) and retry" >&2; exit 2; \
	  fi; \
	fi
endef

# Prometheus (Debian's package) scrapes the workers in the demo and the tests; Debian's chromium
# loads the dashboard page headless in the metrics tests.
deps-prometheus:
	$(call apt_need,prometheus,prometheus)
	$(call apt_need,promtool,prometheus)

deps-chromium:
	$(call apt_need,chromium,chromium)

system-deps: deps-prometheus deps-chromium

# One process by default. TEST_WORKERS=2 runs two pytest-xdist workers, each taking whole files
# (module-scoped clusters start once), the longest files first (tests/conftest.py). On 2 cores
# that is no faster: two Ray-heavy files at once load the machine past its cores and every test
# in them takes twice as long (1,158 s against 1,179 s in one process), and a test that reads a
# Prometheus recording rule right after a restart then loses now and then.
TEST_WORKERS ?= 0

test: install system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The tests that start no SeaweedFS, Ray, Prometheus or chromium and train only briefly (tests/conftest.py
# marks the rest heavy), handed to the xdist workers test by test: none starts a cluster to share.
test-fast: install
	$(BIN)/python -m pytest -q -m "not heavy" -n 2 --dist load

demo: install deps-prometheus
	$(BIN)/python -m orchestrator.demo --dir $(DEMO_DIR)

bench: install system-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(DEMO_DIR) .bench .pytest_cache
