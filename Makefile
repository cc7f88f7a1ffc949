# One command to set up and see it work (`make demo`), one to run the tests (`make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-scale bench-cluster chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: anything that pulls torch later must find it already there.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sae-atlas demo demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest

# Everything but the slow groups (a Ray instance or cluster, Chromium, many pipeline subprocesses):
# the loop while working. `make test` runs every test.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not ray and not browser and not slow" -n 2 -q

# The browser tests drive the system's Chromium (Debian's package); install it when it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$SAE_ATLAS_CHROMIUM" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "The browser tests need Chromium: sudo apt-get install chromium (or set SAE_ATLAS_CHROMIUM)"; exit 1; \
	  fi; }

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	cd bench && for script in pipeline_stages.py activation_pipeline.py queries.py load.py; do ../$(BIN)/python $$script || exit 1; done

# 131,072 latents end to end (about 1.5 hours here); `python bench/scale.py --features N` for other widths.
bench-scale: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	cd bench && ../$(BIN)/python scale.py

# Stage 4 on Ray (an instance of its own) against the local engine at reference scale (about 20 minutes).
bench-cluster: $(STAMP)
	cd bench && ../$(BIN)/python cluster.py

clean:
	rm -rf $(VENV) demo bench/out artifacts .pytest_cache
