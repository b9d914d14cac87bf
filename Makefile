# `make run` serves the playground, `make test` runs the suite; both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test test-fast browser tiny load hostile

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Debian's chromium drives the browser tests (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not browser" $(ARGS)

tiny: $(VENV)/.installed
	$(PY) -m unipixel tiny checkpoints/unipixel-tiny

# Eight gradio_client users at once against a real server: latencies, isolation, memory given back.
load: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) bench/load.py $(ARGS)

# Hostile and careless clients against a real server on the tiny model (bench/hostile.py, ~3 min).
hostile: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) bench/hostile.py $(ARGS)
