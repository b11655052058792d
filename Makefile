# The two commands a user needs: `make run` and `make test`. Everything they need is
# installed into this folder (.venv for Python, .tools for Azurite), nothing globally.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AZURITE_VERSION := 3.37.0
AZURITE := .tools/azurite/node_modules/.bin/azurite
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format chat bench soak clean package teams-package

# Offline checkers of infra/ and appPackage/: checkov in its own venv (its pins clash with the
# app's), and the Teams manifest JSON schemas from Microsoft's npm package.
CHECKOV_VERSION := 3.3.30
CHECKOV := .tools/checkov-venv/bin/checkov
APP_MANIFEST_VERSION := 1.1.2
APP_MANIFEST := .tools/app-manifest/node_modules/@microsoft/app-manifest/package.json

setup: $(STAMP) $(AZURITE) $(CHECKOV) $(APP_MANIFEST)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(AZURITE):
	mkdir -p .tools/azurite
	echo '{"name": "local-azurite", "private": true}' > .tools/azurite/package.json
	cd .tools/azurite && npm install --no-audit --no-fund --no-package-lock --loglevel=error \
		azurite@$(AZURITE_VERSION)

$(CHECKOV):
	$(PYTHON) -m venv .tools/checkov-venv
	.tools/checkov-venv/bin/pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)

$(APP_MANIFEST):
	mkdir -p .tools/app-manifest
	echo '{"name": "local-app-manifest", "private": true}' > .tools/app-manifest/package.json
	cd .tools/app-manifest && npm install --no-audit --no-fund --no-package-lock --ignore-scripts \
		--loglevel=error @microsoft/app-manifest@$(APP_MANIFEST_VERSION)

## The zip `func azure functionapp publish` (or a zip deploy) uploads: dist/functionapp.zip.
package: setup
	$(PY) -m tools.package dist/functionapp.zip

## The Teams app to upload (sideload): dist/teams-app.zip. Needs the bot's app id and the
## app's host name: make teams-package BOT_ID=<guid> BOT_DOMAIN=<app>.azurewebsites.net
teams-package: setup
	$(PY) -m tools.teams_package --bot-id "$(BOT_ID)" --domain "$(BOT_DOMAIN)" dist/teams-app.zip

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

## Benchmarks (not part of make test): side by side with three SDKs behind their own servers
## (cold start, warm throughput, the floor), import + first turn in-process, the reference
## store. Each SDK goes into its own venv under .tools/. Results go to benchmarks/results/.
bench: setup
	$(PY) -m benchmarks.warm --chart --shared-only
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
	rm -rf $(VENV) .tools dist .pytest_cache .ruff_cache .hypothesis
