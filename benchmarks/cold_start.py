"""Cold start: our bot vs. an echo bot on botbuilder (CloudAdapter) and on the Agents SDK.

    .venv/bin/python -m benchmarks.cold_start [--runs 15] [--bots ours,botbuilder,agents]

For each bot, in fresh processes, with the same request:

- import time: wall time around importing the bot's entry module, measured inside the
  process (interpreter start-up, the same for all, is excluded);
- first activity, every bot in unauthenticated local mode: from just before the process
  is spawned until the (loopback) Connector receives the bot's reply to ONE message
  activity, and until the process has its HTTP answer;
- first turn, every bot with its normal authentication (the target's figure): the same,
  the token checked against botsim's OpenID metadata and JWKS and the reply sent with a
  token from botsim's fake AAD, each fetched by the fresh process; compared on the
  answer (the turn is over when it is answered: ours records the conversation before).

Every bot, in both rounds and in the import timing, trusts the same store: the system's
CA certificates plus the fake AAD's, in one file (benchmarks/trust.py).

The SDKs run from their own venv (.tools/bench-sdk-venv, created here from
benchmarks/requirements-sdk.txt), so the product's .venv never holds them. Results go to
benchmarks/results/cold_start.json; the target is ours under half the faster SDK's figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import trust

if TYPE_CHECKING:
    from tools.azurite import Azurite
    from tools.botsim.aad import FakeAAD
    from tools.botsim.connector import FakeConnector

ROOT = Path(__file__).resolve().parent.parent
SDK_VENV = ROOT / ".tools" / "bench-sdk-venv"
SDK_REQUIREMENTS = ROOT / "benchmarks" / "requirements-sdk.txt"
RESULTS = ROOT / "benchmarks" / "results" / "cold_start.json"
TARGET_RATIO = 0.5
CHILD_TIMEOUT = 60.0

# Settings the children must not inherit from the caller's shell: each bot gets exactly ours.
_CONTROLLED_PREFIXES = ("MicrosoftApp", "BOT_", "AzureWebJobs", "CONNECTIONS__", "BENCH_")

# argv: the module to time, then modules to import first (untimed).
_IMPORT_SNIPPET = (
    "import sys, time\n"
    "for name in sys.argv[2:]:\n"
    "    __import__(name)\n"
    "t = time.perf_counter()\n"
    "__import__(sys.argv[1])\n"
    "print((time.perf_counter() - t) * 1000.0)\n"
)

WORKER_PRELOADED = ("asyncio", "azure.functions")

OURS_PACKAGES = (
    "azure-functions",
    "aiohttp",
    "PyJWT",
    "cryptography",
    "msal",
    "azure-storage-blob",
    "azure-identity",
)
SDK_PACKAGES = {
    "botbuilder": ("botbuilder-core", "botbuilder-integration-aiohttp", "botframework-connector"),
    "agents": (
        "microsoft-agents-hosting-core",
        "microsoft-agents-hosting-aiohttp",
        "microsoft-agents-activity",
        "microsoft-agents-authentication-msal",
    ),
}
SHARED_SDK_PACKAGES = ("aiohttp", "msal", "PyJWT", "cryptography")


@dataclass(frozen=True, slots=True)
class Bot:
    """One contender: which interpreter, which module to import, which to handle with."""

    key: str
    label: str
    python: Path
    import_module: str  # what the import-time metric imports
    handler_module: str  # exposes async handle(body, headers) -> int
    packages: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    preloaded: tuple[str, ...] = ()  # also time the import with these already loaded


@dataclass(slots=True)
class Stats:
    n: int
    median: float
    p90: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ordered = sorted(samples)
        rank = max(0, -(-9 * len(ordered) // 10) - 1)  # nearest-rank 90th percentile
        return cls(
            n=len(ordered),
            median=round(statistics.median(ordered), 2),
            p90=round(ordered[rank], 2),
            min=round(ordered[0], 2),
            max=round(ordered[-1], 2),
            samples=[round(s, 2) for s in samples],
        )


@dataclass(slots=True)
class Run:
    reply_ms: float  # spawn -> the Connector received the reply
    preload_ms: float  # of which importing what the host has preloaded (Bot.preloaded)
    answered_ms: float  # spawn -> the process reported its HTTP status
    exit_ms: float  # spawn -> the process exited
    status: int
    loaded: list[str]
    authorization: str | None  # what the reply carried


class BenchmarkError(Exception):
    """A bot did not answer as expected; the message says which and why."""


# --- the SDK venv ---------------------------------------------------------------------------


def ensure_sdk_venv(venv: Path = SDK_VENV, requirements: Path = SDK_REQUIREMENTS) -> Path:
    """Create (or refresh) the SDKs' venv from the pinned requirements; return its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        print(f"creating the SDK venv in {venv.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing {requirements.name} into it ...", flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(digest + "\n")
    return python


# --- measuring ------------------------------------------------------------------------------


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without the bots' own settings, nor the variables that say a
    process runs on Azure (a container may carry one, and ours is measured as a local
    process: on Azure it would refuse unauthenticated mode)."""
    from shared.config import AZURE_HOST_MARKERS

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_CONTROLLED_PREFIXES) and k not in AZURE_HOST_MARKERS
    }
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def measure_import(bot: Bot, preloaded: Sequence[str] = ()) -> float:
    """Milliseconds to import the bot's entry module, measured inside a fresh process.

    ``preloaded`` modules are imported first, outside the timing (what the host process has
    already loaded before it imports the function, e.g. the Functions worker's
    azure.functions).
    """
    result = subprocess.run(
        [str(bot.python), "-c", _IMPORT_SNIPPET, bot.import_module, *preloaded],
        cwd=ROOT,
        env=child_env(bot.env),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    if result.returncode != 0:
        raise BenchmarkError(
            f"{bot.key}: import {bot.import_module} failed:\n{_tail(result.stderr)}"
        )
    return float(result.stdout.strip().splitlines()[-1])


def measure_first_activity(bot: Bot, connector: FakeConnector, request: Mapping[str, str]) -> Run:
    """Spawn a fresh process that handles one activity; time until its reply arrives."""
    env = child_env({**bot.env, **request, "BENCH_PRELOAD": ",".join(bot.preloaded)})
    connector.reset()
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(bot.python), "-m", "benchmarks.sdk.run_once", bot.handler_module],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        line = process.stdout.readline()  # type: ignore[union-attr]
        answered = time.perf_counter()
        try:
            process.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        exited = time.perf_counter()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    return _check_run(bot, connector, line, errors, started, answered, exited)


def _check_run(
    bot: Bot,
    connector: FakeConnector,
    line: bytes,
    errors: str,
    started: float,
    answered: float,
    exited: float,
) -> Run:
    try:
        answer = json.loads(line)
    except ValueError:
        raise BenchmarkError(
            f"{bot.key}: the bot process gave no answer:\n{_tail(errors)}"
        ) from None
    try:  # the process has exited: whatever it sent has been recorded
        received = connector.wait_for_sync(lambda requests: requests, timeout=2.0)
    except TimeoutError:
        received = []
    if not 200 <= answer["status"] < 300 or len(received) != 1:
        raise BenchmarkError(
            f"{bot.key}: status {answer['status']}, {len(received)} request(s) reached the "
            f"Connector (expected one reply):\n{_tail(errors)}"
        )
    reply = received[0].json or {}
    if "hello" not in (reply.get("text") or "") or reply.get("replyToId") != "act-1":
        raise BenchmarkError(f"{bot.key}: unexpected reply {reply!r}")
    return Run(
        reply_ms=(received[0].time - started) * 1000.0,
        preload_ms=answer.get("preload_ms", 0.0),
        answered_ms=(answered - started) * 1000.0,
        exit_ms=(exited - started) * 1000.0,
        status=answer["status"],
        loaded=answer.get("loaded", []),
        authorization=received[0].authorization,
    )


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def message_activity(service_url: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "act-1",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "channelId": "msteams",
        "serviceUrl": service_url,
        "from": {"id": "user-1", "name": "User"},
        "recipient": {"id": "bot-1", "name": "Bot"},
        "conversation": {"id": "conv-1"},
        "locale": "en-US",
        "text": "hello",
        "textFormat": "plain",
    }


def import_profile(
    bot: Bot, args: Sequence[str], extra_env: Mapping[str, str] | None = None, top: int = 12
) -> dict[str, Any]:
    """`-X importtime` of a fresh process: the heaviest modules, cumulative and self.

    ``top_level`` lists the imports made outside any other import (module level of the
    entry point, or lazily inside a function): together they are all the import time.
    """
    result = subprocess.run(
        [str(bot.python), "-X", "importtime", *args],
        cwd=ROOT,
        env=child_env({**bot.env, **(extra_env or {})}),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        rows.append(
            {
                "module": name.strip(),
                "self_ms": int(own) / 1000,
                "cumulative_ms": int(cumulative) / 1000,
                "top_level": name[1:2] != " ",  # nested imports are indented by two spaces
            }
        )
    by_cumulative = sorted(rows, key=lambda r: r["cumulative_ms"], reverse=True)
    top_level = [r for r in by_cumulative if r["top_level"]]
    return {
        "modules": len(rows),
        "total_ms": round(sum(r["cumulative_ms"] for r in top_level), 1),
        "top_level": top_level[:top],
        "cumulative": by_cumulative[:top],
        "self": sorted(rows, key=lambda r: r["self_ms"], reverse=True)[:top],
    }


# --- the contenders -------------------------------------------------------------------------


def local_mode_env(key: str, connector_url: str, storage: str = "") -> dict[str, str]:
    """Unauthenticated local mode for every bot: no app id, auth disabled.

    Ours also records the conversation reference (the SDK echo samples store nothing), so
    it gets a storage account: ``storage`` is Azurite's connection string.
    """
    if key == "ours":
        return {
            "MicrosoftAppId": "",
            "BOT_ALLOW_UNAUTHENTICATED": "true",
            "BOT_TRUSTED_SERVICE_URLS": connector_url,
            "AzureWebJobsStorage": storage,
        }
    return {"MicrosoftAppId": "", "MicrosoftAppPassword": ""}


def contenders(
    sdk_python: Path | None,
    connector_url: str,
    storage: str,
    keys: Sequence[str],
    trust: Mapping[str, str] | None = None,
) -> list[Bot]:
    """The bots ``keys`` names, in unauthenticated local mode, each also given ``trust``
    (the trust store's settings, benchmarks/trust.py), which stays theirs in both rounds."""
    bots = {
        "ours": Bot(
            "ours",
            "ours (messages_function)",
            Path(sys.executable),
            "messages_function",
            "benchmarks.ours_bot",
            OURS_PACKAGES,
            local_mode_env("ours", connector_url, storage),
            # The Functions worker (an asyncio program) has asyncio and azure.functions
            # loaded before it imports a function.
            preloaded=WORKER_PRELOADED,
        )
    }
    if sdk_python is not None:
        bots["botbuilder"] = Bot(
            "botbuilder",
            "Bot Framework SDK (CloudAdapter)",
            sdk_python,
            "benchmarks.sdk.botbuilder_echo",
            "benchmarks.sdk.botbuilder_echo",
            SDK_PACKAGES["botbuilder"] + SHARED_SDK_PACKAGES,
            local_mode_env("botbuilder", connector_url),
            preloaded=WORKER_PRELOADED,  # as on Functions, like ours
        )
        bots["agents"] = Bot(
            "agents",
            "Microsoft 365 Agents SDK",
            sdk_python,
            "benchmarks.sdk.agents_echo",
            "benchmarks.sdk.agents_echo",
            SDK_PACKAGES["agents"] + SHARED_SDK_PACKAGES,
            local_mode_env("agents", connector_url),
            preloaded=WORKER_PRELOADED,  # as on Functions, like ours
        )
    return [replace(bots[k], env={**bots[k].env, **(trust or {})}) for k in keys if k in bots]


def describe(bot: Bot) -> dict[str, Any]:
    script = (
        "import importlib.metadata as m, json, platform, sys\n"
        "v = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: v[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: v[n] = None\n"
        "print(json.dumps({'python': platform.python_version(), 'packages': v}))\n"
    )
    result = subprocess.run(
        [str(bot.python), "-c", script, *bot.packages],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=True,
    )
    return json.loads(result.stdout)


# --- the run --------------------------------------------------------------------------------


def start_storage(services: ExitStack) -> Azurite:
    """Azurite in memory (no queue traffic here; see warm.start_services) with the
    references container (as deployed infra provides it)."""
    from tools.azurite import Azurite, ensure_resources

    azurite = services.enter_context(Azurite())
    ensure_resources(azurite.connection_string, [], ["conversation-references"])
    return azurite


def start_connector(services: ExitStack) -> FakeConnector:
    """botsim's fake Connector on loopback, stamping each request with time.perf_counter()."""
    from tools.botsim.connector import FakeConnector

    return services.enter_context(FakeConnector(clock=time.perf_counter))


def round_order(bots: Sequence[Bot], round_: int) -> list[Bot]:
    """The bots in the order of round ``round_``: rotated by one each round, as
    benchmarks/warm.py's rounds are, so that no bot always runs first (or right after
    another, on the caches and the machine's state it leaves)."""
    shift = round_ % len(bots) if bots else 0
    return [*bots[shift:], *bots[:shift]]


def interleaved(
    bots: Sequence[Bot], runs: int, measure: Callable[[Bot], Any]
) -> dict[str, list[Any]]:
    """One discarded warm-up per bot (writes .pyc files), then ``runs`` rounds, each in
    another order (:func:`round_order`)."""
    for bot in bots:
        measure(bot)
    samples: dict[str, list] = {bot.key: [] for bot in bots}
    for round_ in range(runs):
        for bot in round_order(bots, round_):
            samples[bot.key].append(measure(bot))
    return samples


def comparison(
    results: Mapping[str, Mapping[str, Any]], metric: str, ours_metric: str | None = None
) -> dict[str, Any] | None:
    """Ours (``ours_metric``, default ``metric``) against the faster SDK's ``metric``."""
    sdks = {k: v[metric]["median"] for k, v in results.items() if k != "ours" and metric in v}
    ours_metric = ours_metric or metric
    if ours_metric not in results.get("ours", {}) or not sdks:
        return None
    fastest = min(sdks, key=sdks.get)  # type: ignore[arg-type]
    ours = results["ours"][ours_metric]["median"]
    ratio = round(ours / sdks[fastest], 3)
    return {
        "ours": ours_metric,
        "ours_ms": ours,
        "fastest_sdk": fastest,
        "fastest_sdk_ms": sdks[fastest],
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "pass": ratio < TARGET_RATIO,
    }


COMPARISONS = {
    # the target's figures: the whole import / spawn-to-reply, azure.functions included for
    # every bot (each would run on Functions, whose worker imports it)
    "import": ("import_ms", None),
    "first_activity": ("first_activity_ms", None),
    # the same without the Functions worker's own azure.functions import, for every bot
    "import_excl_preloaded": ("import_ms_excl_preloaded", None),
    "first_activity_excl_preloaded": ("first_activity_ms_excl_preloaded", None),
}


def summarize(
    bot: Bot, imports: list[float], preloaded: list[float] | None, first: list[Run]
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "label": bot.label,
        **describe(bot),
        "import_module": bot.import_module,
        "import_ms": asdict(Stats.of(imports)),
    }
    if preloaded:
        summary["import_ms_excl_preloaded"] = {
            "preloaded": list(bot.preloaded),
            **asdict(Stats.of(preloaded)),
        }
    summary["first_activity_ms"] = asdict(Stats.of([r.reply_ms for r in first]))
    if bot.preloaded:
        summary["first_activity_ms_excl_preloaded"] = {
            "preloaded": list(bot.preloaded),
            **asdict(Stats.of([r.reply_ms - r.preload_ms for r in first])),
        }
    summary |= {
        "answered_ms": asdict(Stats.of([r.answered_ms for r in first])),
        "exit_ms": asdict(Stats.of([r.exit_ms for r in first])),
        "http_status": first[-1].status,
        "heavy_modules_loaded_by_first_activity": first[-1].loaded,
    }
    return summary


def measure_bots(
    bots: Sequence[Bot], runs: int, connector: FakeConnector, request: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    print(f"import time: {runs} runs per bot ...", flush=True)
    imports = interleaved(bots, runs, measure_import)
    with_preloaded = [b for b in bots if b.preloaded]
    preloaded = interleaved(with_preloaded, runs, lambda b: measure_import(b, b.preloaded))
    print(f"first activity: {runs} runs per bot ...", flush=True)
    firsts = interleaved(bots, runs, lambda b: measure_first_activity(b, connector, request))
    return {
        bot.key: summarize(bot, imports[bot.key], preloaded.get(bot.key), firsts[bot.key])
        for bot in bots
    }


def start_aad(services: ExitStack) -> tuple[FakeAAD, dict[str, str]]:
    """botsim's HTTPS fake AAD (JWT-shaped tokens: the Agents SDK reads their claims) and
    the settings of the one trust store every bot gets in both rounds: the system's CA
    certificates plus the fake's (benchmarks/trust.py), in a folder removed at the end."""
    from tools.botsim.aad import FakeAAD

    aad = services.enter_context(FakeAAD(jwt_tokens=True))
    folder = services.enter_context(tempfile.TemporaryDirectory(prefix="bench-trust-"))
    return aad, trust.env(trust.bundle(aad.ca_path, folder))


def authenticated(bot: Bot, app_id: str, secret: str, aad_url: str, channel: Any) -> Bot:
    """``bot`` with its normal authentication against botsim (``channel``: its channel
    IdentityService), everything else in its settings kept (the trust store among them)."""
    if bot.key == "ours":
        env = {
            **{k: v for k, v in bot.env.items() if k != "BOT_ALLOW_UNAUTHENTICATED"},
            "MicrosoftAppId": app_id,
            "MicrosoftAppPassword": secret,
            "BOT_LOGIN_AUTHORITY": aad_url,
            "BOT_OPENID_METADATA_URL": channel.metadata_url,
        }
    else:
        env = {
            **bot.env,
            "BENCH_APP_ID": app_id,
            "BENCH_APP_PASSWORD": secret,
            "BENCH_AAD_URL": aad_url,
            "BENCH_OPENID_METADATA_URL": channel.metadata_url,
            "BENCH_EMULATOR_OPENID_METADATA_URL": channel.metadata_url,
            "BENCH_JWKS_URL": channel.jwks_url,
        }
    return replace(bot, env=env)


def measure_authenticated(
    bots: Sequence[Bot], runs: int, connector: FakeConnector, services: ExitStack, aad: FakeAAD
) -> dict[str, dict[str, Any]]:
    """Every bot with its normal authentication: a botsim channel JWT in, checked against
    botsim's OpenID metadata and JWKS, and the reply sent with a token from botsim's fake
    AAD. Each fresh process fetches the metadata and keys, validates the token and obtains
    its own token over HTTPS before it can reply: the whole cold path, as deployed.
    """
    from tools.botsim.identity import IdentityService

    channel = services.enter_context(IdentityService.channel())
    app_id, secret = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
    aad.register_secret(app_id, secret)
    service_url = connector.url + "/"
    token = channel.mint_channel_token(app_id, service_url, lifetime=6 * 3600)
    authed = [authenticated(bot, app_id, secret, aad.url, channel) for bot in bots]
    request = {
        "BENCH_BODY": json.dumps(message_activity(service_url)),
        "BENCH_AUTHORIZATION": f"Bearer {token}",
    }
    print(f"first activity, every bot authenticated: {runs} runs per bot ...", flush=True)
    firsts = interleaved(authed, runs, lambda b: measure_first_activity(b, connector, request))
    results = {}
    for bot in authed:
        measured = firsts[bot.key]
        if not all(aad.is_valid_token(_bearer(r.authorization)) for r in measured):
            raise BenchmarkError(f"{bot.key}: a reply did not carry the fake AAD's token")
        results[bot.key] = {
            "label": bot.label,
            "first_activity_ms": asdict(Stats.of([r.reply_ms for r in measured])),
            "answered_ms": asdict(Stats.of([r.answered_ms for r in measured])),
            "answered_ms_excl_preloaded": {
                "preloaded": list(bot.preloaded),
                **asdict(Stats.of([r.answered_ms - r.preload_ms for r in measured])),
            },
            "heavy_modules_loaded_by_first_activity": measured[-1].loaded,
        }
    return results


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[len("bearer ") :]
    return None


def run(runs: int, keys: Sequence[str], install: bool = True, full_auth: bool = True) -> dict:
    load_start = round(os.getloadavg()[0], 2)
    sdk_python = None
    if any(k != "ours" for k in keys):
        sdk_python = ensure_sdk_venv() if install else SDK_VENV / "bin" / "python"
    with ExitStack() as services:
        connector = start_connector(services)
        storage = start_storage(services) if "ours" in keys else None
        aad, trusted = start_aad(services)
        bots = contenders(
            sdk_python, connector.url, storage.connection_string if storage else "", keys, trusted
        )
        request = {"BENCH_BODY": json.dumps(message_activity(connector.url + "/"))}
        results = measure_bots(bots, runs, connector, request)
        report: dict[str, Any] = {
            "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.cold_start",
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_1m": {"start": load_start, "end": None},
            },
            "runs": runs,
            "auth_mode": "unauthenticated local mode (no app id) for every bot",
            "trust_store": "the system's CA certificates + the fake AAD's, for every bot in"
            " both rounds (benchmarks/trust.py)",
            "bots": results,
            "comparison": {
                name: comparison(results, *metrics) for name, metrics in COMPARISONS.items()
            },
        }
        ours = next((b for b in bots if b.key == "ours"), None)
        if ours is not None:
            connector.reset()
            report["ours_importtime"] = {
                "import": import_profile(ours, ["-c", "import messages_function"]),
                "first_activity": import_profile(
                    ours, ["-m", "benchmarks.sdk.run_once", ours.handler_module], request
                ),
            }
        if full_auth:
            connector.reset()
            measured = measure_authenticated(bots, runs, connector, services, aad)
            report["authenticated"] = {
                "auth": "every bot's own: a channel JWT checked against botsim's OpenID "
                "metadata and JWKS, the reply sent with the fake AAD's token",
                "bots": measured,
                # The target's figures: the whole first turn, until the HTTP answer (ours
                # records the conversation after its reply and before it answers).
                "comparison": {
                    name: comparison(measured, metric)
                    for name, metric in (
                        ("first_turn_answered", "answered_ms"),
                        ("first_turn_answered_excl_preloaded", "answered_ms_excl_preloaded"),
                    )
                },
            }
        report["machine"]["load_average_1m"]["end"] = round(os.getloadavg()[0], 2)
        return report


def print_table(report: Mapping[str, Any]) -> None:
    print()
    print(f"{'median ms (p90)':40} {'import':>16} {'first activity':>18}")
    for data in report["bots"].values():
        _print_row(data["label"], data["import_ms"], data["first_activity_ms"])
        if "import_ms_excl_preloaded" in data:
            preloaded = ", ".join(data["import_ms_excl_preloaded"]["preloaded"])
            _print_row(
                f"  without {preloaded}",
                data["import_ms_excl_preloaded"],
                data["first_activity_ms_excl_preloaded"],
            )
    authenticated = report.get("authenticated")
    comparisons = dict(report["comparison"])
    if authenticated:
        print(f"\n{'authenticated, median ms (p90)':40} {'reply':>16} {'answered':>18}")
        for data in authenticated["bots"].values():
            _print_row(data["label"], data["first_activity_ms"], data["answered_ms"])
        comparisons |= authenticated["comparison"]
    print()
    for name, result in comparisons.items():
        if result:
            verdict = "PASS" if result["pass"] else "FAIL"
            print(
                f"{name:30} ours / {result['fastest_sdk']:10} = {result['ratio']:.2f}"
                f"  (target < {result['target_ratio']}) {verdict}"
            )


def _print_row(label: str, imported: Mapping[str, float], first: Mapping[str, float]) -> None:
    print(
        f"{label:40} {imported['median']:>7.1f} ({imported['p90']:>6.1f})"
        f" {first['median']:>9.1f} ({first['p90']:>6.1f})"
    )


def write_report(report: Mapping[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__)
    parser.add_argument("--runs", type=int, default=15, help="measured runs per bot and metric")
    parser.add_argument("--bots", default="ours,botbuilder,agents", help="comma-separated subset")
    parser.add_argument("--no-install", action="store_true", help="use the SDK venv as it is")
    parser.add_argument(
        "--no-full-auth", action="store_true", help="skip the round with every bot authenticated"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.bots.split(",") if k.strip()]
    try:
        report = run(args.runs, keys, not args.no_install, not args.no_full_auth)
    except BenchmarkError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    write_report(report, args.output)
    print_table(report)
    shown = args.output.resolve()
    print(f"\nwritten to {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
