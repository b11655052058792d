# The two commands a user needs: `make run` and `make test`. Everything they need is
# installed into this folder (.venv for Python, .tools for Azurite), nothing globally.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AZURITE_VERSION := 3.37.0
AZURITE := .tools/azurite/node_modules/.bin/azurite
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format chat bench soak clean

setup: $(STAMP) $(AZURITE)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(AZURITE):
	mkdir -p .tools/azurite
	echo '{"name": "local-azurite", "private": true}' > .tools/azurite/package.json
	cd .tools/azurite && npm install --no-audit --no-fund --no-package-lock --loglevel=error \
		azurite@$(AZURITE_VERSION)

## Run the bot locally on http://127.0.0.1:7071 with Azurite on its default ports.
run: setup
	$(PY) -m tools.run_local

## Type messages to the locally running bot (start `make run` first, in another terminal).
chat: setup
	$(PY) -m tools.botsim chat

## Lint, then every test (unit + Azurite integration + end-to-end). Starts and stops its own Azurite.
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

## Benchmarks (not part of make test): cold start against the two SDKs, and the reference store.
## Results go to benchmarks/results/.
bench: setup
	$(PY) -m benchmarks.cold_start
	$(PY) -m benchmarks.bench_references

## Soak (not part of make test): one broadcast to 10,000 conversations through two local
## hosts, the fake Connector enforcing Teams limits; results in benchmarks/results/.
soak: setup
	$(PY) -m benchmarks.proactive_soak

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .hypothesis
