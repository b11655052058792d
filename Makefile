# The two commands a user needs: `make run` and `make test`. Everything they need is
# installed into this folder (.venv for Python, .tools for Azurite), nothing globally.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AZURITE_VERSION := 3.37.0
AZURITE := .tools/azurite/node_modules/.bin/azurite
AZURITE_STAMP := .tools/azurite/node_modules/.installed-$(AZURITE_VERSION)
STAMP := $(VENV)/.installed
PLAYGROUND_VERSION := 0.2.28
PLAYGROUND := .tools/playground/node_modules/.bin/agentsplayground
PLAYGROUND_STAMP := .tools/playground/node_modules/.installed-$(PLAYGROUND_VERSION)
CHANNEL ?= msteams
# Playwright (browser test) drives Debian's chromium: it never downloads a browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: setup run test lint format chat playground browser bench soak clean package teams-package

# Offline checkers of infra/ and appPackage/: checkov in its own venv (its pins clash with the
# app's), and the Teams manifest JSON schemas from Microsoft's npm package.
CHECKOV_VERSION := 3.3.30
CHECKOV := .tools/checkov-venv/bin/checkov
CHECKOV_STAMP := .tools/checkov-venv/.installed-$(CHECKOV_VERSION)
APP_MANIFEST_VERSION := 1.1.2
APP_MANIFEST := .tools/app-manifest/node_modules/@microsoft/app-manifest/package.json
APP_MANIFEST_STAMP := .tools/app-manifest/node_modules/.installed-$(APP_MANIFEST_VERSION)

# Each tool's stamp names its version and lives in what it stands for (node_modules, the
# venv): a pinned version changed by a pull (up or down) is installed, and so is a tool
# whose folder was deleted.
setup: $(STAMP) $(AZURITE_STAMP) $(CHECKOV_STAMP) $(APP_MANIFEST_STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@echo "Installing the Python packages into $(VENV) (first run only: about 20-60 s)..."
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@
	@echo "Python packages installed."

# $(call npm_tool,FOLDER,PACKAGE@VERSION,NAME,HOW LONG): an npm package, pinned, in .tools/FOLDER.
# No npm spinner: its glyphs stick to the next line when the output is not a terminal.
define npm_tool
	@echo "Installing $(3) into .tools/$(1) (npm; first run only: $(4))..."
	@rm -f .tools/$(1)/node_modules/.installed-*
	@mkdir -p .tools/$(1)
	@echo '{"name": "local-$(1)", "private": true}' > .tools/$(1)/package.json
	@cd .tools/$(1) && npm install --no-audit --no-fund --no-package-lock --no-progress \
		--loglevel=error $(2)
	@echo "$(3) installed."
	@touch $@
endef

$(AZURITE_STAMP):
	$(call npm_tool,azurite,azurite@$(AZURITE_VERSION),Azurite $(AZURITE_VERSION),about 30-60 s)

$(PLAYGROUND_STAMP):
	$(call npm_tool,playground,@microsoft/m365agentsplayground@$(PLAYGROUND_VERSION),Microsoft 365 Agents Playground $(PLAYGROUND_VERSION),a few seconds)

## Chromium for the browser test: Debian's package, installed when missing and possible
## (root with apt-get). Without it the test skips and says why; under CI=true it fails.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing Chromium (Debian package chromium; first run only: about 1 min)..."; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends chromium >/dev/null) \
				|| echo "Chromium could not be installed: the browser test will say so."; \
		else \
			echo "No chromium here (install Debian's chromium as root): the browser test skips."; \
		fi; \
	fi

$(CHECKOV_STAMP):
	@echo "Installing checkov $(CHECKOV_VERSION) into .tools/checkov-venv (first run only: about 30-60 s)..."
	@rm -f .tools/checkov-venv/.installed-*
	@$(PYTHON) -m venv .tools/checkov-venv
	@.tools/checkov-venv/bin/pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	@touch $@

$(APP_MANIFEST_STAMP):
	@echo "Installing the Teams manifest schemas into .tools/app-manifest (npm; first run only: a few seconds)..."
	@rm -f .tools/app-manifest/node_modules/.installed-*
	@mkdir -p .tools/app-manifest
	@echo '{"name": "local-app-manifest", "private": true}' > .tools/app-manifest/package.json
	@cd .tools/app-manifest && npm install --no-audit --no-fund --no-package-lock --ignore-scripts \
		--no-progress --loglevel=error @microsoft/app-manifest@$(APP_MANIFEST_VERSION)
	@touch $@

## The zip `func azure functionapp publish` (or a zip deploy) uploads: dist/functionapp.zip.
package: setup
	$(PY) -m tools.package dist/functionapp.zip

## The Teams app to upload (sideload): dist/teams-app.zip. Needs the bot's app id and the
## app's host name: make teams-package BOT_ID=<guid> BOT_DOMAIN=<app>.azurewebsites.net
teams-package: $(STAMP) $(APP_MANIFEST_STAMP)
	$(PY) -m tools.teams_package --bot-id "$(BOT_ID)" --domain "$(BOT_DOMAIN)" dist/teams-app.zip

## Run the bot locally on http://127.0.0.1:7071 with Azurite on its default ports.
# Only what running the bot needs (not the checkers `make test` uses).
run: $(STAMP) $(AZURITE_STAMP)
	@$(PY) -m tools.run_local

## Type messages to the locally running bot (start `make run` first, in another terminal).
chat: $(STAMP)
	$(PY) -m tools.botsim chat

## Microsoft 365 Agents Playground (a Teams-like page) against the local bot; starts the bot
## when `make run` is not running. CHANNEL=webchat or CHANNEL=emulator for another channel.
playground: $(STAMP) $(AZURITE_STAMP) $(PLAYGROUND_STAMP)
	@$(PY) -m tools.playground --channel $(CHANNEL)

## Lint, then every test (unit + Azurite integration + end-to-end). Starts and stops its own Azurite.
test: setup $(PLAYGROUND_STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

## Benchmarks (not part of make test): side by side with three SDKs behind their own servers
## (cold start, warm throughput, the floor), a broadcast through the queue pipeline under
## Teams' limits and the SDKs' own proactive loops over the same conversations, import +
## first turn in-process, the reference store. Each SDK goes into its own venv under
## .tools/. Results go to benchmarks/results/.
bench: setup
	$(PY) -m benchmarks.warm --chart --shared-only
	$(PY) -m benchmarks.broadcast --unthrottled
	$(PY) -m benchmarks.broadcast --processes 1,4 --tenant-limit 15 --output benchmarks/results/broadcast_paced.json
	$(PY) -m benchmarks.broadcast_peers --unthrottled --chart
	$(PY) -m benchmarks.cold_start
	$(PY) -m benchmarks.bench_references
	$(PY) -m benchmarks.pacing_instances

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
