"""A small, faithful local stand-in for the Azure Functions host (classic Python model).

    python -m tools.devhost [--port 7071] [--host 127.0.0.1] [--root .] [--functions NAME ...]

Reads host.json and every `*/function.json` under the root and serves HTTP triggers,
polls queue triggers and fires timer triggers, passing real `azure.functions` types.
Settings come from `local.settings.json` `Values`, overridden by the environment.
See README.md (architecture notes); modules: settings, app, invoker, http, queue, storage,
timer, host.
"""
