# alexray: make install | make test | make demo | make bench
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install system-deps test demo bench clean

install: $(STAMP)

# Rebuilt only when the dependency list changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# Services the tests start themselves: Prometheus comes from Debian's package.
system-deps:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "prometheus is missing: run 'sudo apt-get install prometheus' (Debian/Ubuntu) and retry" >&2; exit 2; \
	  fi; \
	fi

test: install system-deps
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m orchestrator.demo --dir $(DEMO_DIR)

bench: install system-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(DEMO_DIR) .bench .pytest_cache
