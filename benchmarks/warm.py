"""Side by side with three SDKs, each behind its own server: cold start and warm throughput.

    .venv/bin/python -m benchmarks.warm [--repeats 3] [--seconds 5] [--concurrency 1,8,32]
                                        [--targets ours,botbuilder,agents,teams] [--smoke]
    .venv/bin/python -m benchmarks.warm --table-only [--chart] [--output RESULTS.json]

Every bot is an echo bot with its normal authentication against botsim: channel tokens
(RS256, minted by botsim's IdentityService) checked against botsim's OpenID metadata and
JWKS, and the reply sent with the bot's own token from botsim's HTTPS fake AAD to
botsim's fake Connector, which runs in a process of its own and counts the replies.
Every bot trusts the same store: the system's CA certificates plus the fake AAD's, in one
file (benchmarks/trust.py).

- ours: ``python -m tools.devhost`` (the repo's local Functions host) serving
  ``messages_function``, with Azurite for the conversation references it records;
- Bot Framework SDK 4.17.1: CloudAdapter on aiohttp (benchmarks/peers/botbuilder_server.py);
- Microsoft 365 Agents SDK 1.9.0: its aiohttp hosting (benchmarks/peers/agents_server.py);
- Microsoft Teams SDK for Python 2.1.1: ``App.start`` (benchmarks/peers/teams_server.py).

Each peer runs from its own virtual environment under .tools/ (bench-<peer>), created
here from benchmarks/peers/requirements-<peer>.txt; the product's .venv never holds them.

Measured, targets interleaved, medians of the repeats:

- cold: spawn → first authenticated echo answered (the bot fetched the JWKS, checked
  the token, got its own token, sent the reply); and when the port first accepted;
- warm: activities/s, p50/p99 latency (POST → HTTP answer) at each concurrency, CPU per
  activity (the server process's user + system time), peak RSS (VmHWM), replies counted
  at the fake Connector: lost (a 2xx answer whose reply never arrived) and duplicated;
- the floor: one RS256 verification plus one loopback POST, alone, in this process.

Half of the activities go to 8 shared group conversations, half each to a new 1:1
conversation (a new user, so ours records a reference and a user index; the SDK samples
store nothing); ``--shared-only`` adds a run with group conversations only. The channel is
``webchat`` (no published per-conversation limits, so pacing is not what is measured).
Results: benchmarks/results/warm.json and warm.md (ratios ours / theirs; CPU per
activity of the bot's process, and beside it with the storage emulator's, which only ours
uses); a PNG chart with ``--chart`` (needs .tools/bench-report, made from
requirements-report.txt). ``--table-only`` rewrites the table (and the chart) from the
results alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import trust

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
RESULTS = ROOT / "benchmarks" / "results"
LOGS = TOOLS / "bench-logs"
SHARED_CONVERSATIONS = 8
CHANNEL = "webchat"
START_TIMEOUT = 60.0
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    venv: str | None  # .tools/<venv>; None: the product's .venv
    module: str
    packages: tuple[str, ...] = ()

    @property
    def requirements(self) -> Path | None:
        if self.venv is None:
            return None
        return ROOT / "benchmarks" / "peers" / f"requirements-{self.key}.txt"

    @property
    def python(self) -> Path:
        venv = ROOT / ".venv" if self.venv is None else TOOLS / self.venv
        return venv / "bin" / "python"


TARGETS: dict[str, Target] = {
    "ours": Target("ours", "this bot (tools.devhost)", None, "tools.devhost"),
    "botbuilder": Target(
        "botbuilder",
        "Bot Framework SDK 4.17.1",
        "bench-botbuilder",
        "benchmarks.peers.botbuilder_server",
        ("botbuilder-core", "botbuilder-integration-aiohttp", "aiohttp", "msal"),
    ),
    "agents": Target(
        "agents",
        "Agents SDK 1.9.0",
        "bench-agents",
        "benchmarks.peers.agents_server",
        ("microsoft-agents-hosting-aiohttp", "aiohttp", "msal"),
    ),
    "teams": Target(
        "teams",
        "Teams SDK 2.1.1",
        "bench-teams",
        "benchmarks.peers.teams_server",
        ("microsoft-teams-apps", "fastapi", "uvicorn", "httpx", "msal"),
    ),
}


class BenchmarkError(Exception):
    """A bot did not answer as expected; the message says which and why."""


# --- environments ---------------------------------------------------------------------------


def ensure_venv(target: Target) -> None:
    """Create (or refresh) a peer's venv from its pinned requirements."""
    requirements = target.requirements
    if requirements is None:
        return
    venv = TOOLS / str(target.venv)
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    if not target.python.exists():
        print(f"creating {venv.relative_to(ROOT)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(target.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(digest + "\n")


def versions(target: Target) -> dict[str, str]:
    names = target.packages or ("azure-functions", "aiohttp", "PyJWT", "msal")
    code = (
        "import importlib.metadata as m, json, sys, platform\n"
        "out = {'python': platform.python_version()}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(target.python), "-c", code, *names], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


# --- the services every bot talks to ------------------------------------------------------


@dataclass(slots=True)
class Services:
    app_id: str
    secret: str
    channel_metadata: str
    emulator_metadata: str
    jwks: str
    aad_url: str
    ca_path: str  # the trust store every bot gets: the system's CAs + the fake AAD's (trust.py)
    connector_url: str
    token: str
    storage: str
    connector: ConnectorProcess
    storage_pid: int = 0  # Azurite's process (0: no storage), for its CPU time
    # Tokens the fake AAD has issued to the bots' app so far (each bot asks for its own).
    tokens_issued: Callable[[], int] = lambda: 0

    def storage_cpu_seconds(self) -> float:
        if not self.storage_pid:
            return 0.0
        fields = Path(f"/proc/{self.storage_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def env(self, target: Target, port: int) -> dict[str, str]:
        keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL") if k in os.environ}
        common = {**keep, **trust.env(self.ca_path)}
        if target.key == "ours":
            return {
                **common,
                "MicrosoftAppId": self.app_id,
                "MicrosoftAppPassword": self.secret,
                "BOT_LOGIN_AUTHORITY": self.aad_url,
                "BOT_OPENID_METADATA_URL": self.channel_metadata,
                "BOT_EMULATOR_OPENID_METADATA_URL": self.emulator_metadata,
                "BOT_TRUSTED_SERVICE_URLS": self.connector_url,
                "AzureWebJobsStorage": self.storage,
            }
        return {
            **common,
            "PYTHONPATH": str(ROOT),
            "BENCH_PORT": str(port),
            "BENCH_APP_ID": self.app_id,
            "BENCH_APP_PASSWORD": self.secret,
            "BENCH_AAD_URL": self.aad_url,
            "BENCH_OPENID_METADATA_URL": self.channel_metadata,
            "BENCH_EMULATOR_OPENID_METADATA_URL": self.emulator_metadata,
            "BENCH_JWKS_URL": self.jwks,
        }


class ConnectorProcess:
    """benchmarks/connector_process.py: the fake Connector, counting replies.

    ``token_check`` (the fake AAD's ``is_valid_token``): what ``stats()["authorized"]``
    counts, the replies whose bearer token it accepts, each token checked when first
    seen; without it, any ``Bearer`` header longer than 20 characters counts.
    """

    def __init__(
        self, args: Sequence[str] = (), token_check: Callable[[str], bool] | None = None
    ) -> None:
        self.token_check = token_check
        self._verdicts: dict[str, bool] = {}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.connector_process", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self._read()["url"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise BenchmarkError("the fake Connector process ended")
        return json.loads(line)

    def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._read()

    def stats(self, texts: bool = False) -> dict[str, Any]:
        asked = ["stats", *(["texts"] if texts else []), *(["tokens"] if self.token_check else [])]
        answer = self.command(" ".join(asked))
        if self.token_check is not None:
            answer["authorized"] = sum(
                n for token, n in answer.pop("tokens").items() if self._valid(token)
            )
        return answer

    def _valid(self, token: str) -> bool:
        if token not in self._verdicts:
            assert self.token_check is not None
            self._verdicts[token] = bool(token) and self.token_check(token)
        return self._verdicts[token]

    def conversations_with(self, text: str) -> int:
        """How many conversations have received ``text`` since the last reset."""
        return self.command(f"delivered {text}")["conversations"]

    def reset(self) -> None:
        self.command("reset")

    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        with suppress(BrokenPipeError, BenchmarkError, ValueError):
            self.command("quit")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_services(
    stack: ExitStack,
    need_storage: bool,
    connector_args: Sequence[str] = (),
    *,
    queue_traffic: bool = False,
) -> Services:
    """The identity services, the fake AAD and Connector, and Azurite when `need_storage`.

    Azurite keeps its data on disk when `queue_traffic` (the broadcast): in memory, every
    queue message is an extent of its own, and its once-a-minute queue garbage collection
    removes them one at a time from an indexed collection, freezing it for 16 s in a
    broadcast. Without queue traffic (a turn writes blobs only) it stays in memory, where a
    blob write costs it 20-40 % less CPU than on disk (benchmarks/README.md, "Broadcast:
    Azurite's freezes").
    """
    from tools.botsim.aad import FakeAAD
    from tools.botsim.identity import start_identity_services

    identity = stack.enter_context(start_identity_services())
    aad = stack.enter_context(FakeAAD(jwt_tokens=True))
    trust_dir = tempfile.mkdtemp(prefix="bench-trust-")
    stack.callback(shutil.rmtree, trust_dir, ignore_errors=True)
    trust_store = trust.bundle(aad.ca_path, trust_dir)
    app_id, secret = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
    aad.register_secret(app_id, secret)
    # A reply counts as authorized with a token the fake AAD issued for the Connector.
    connector = ConnectorProcess(connector_args, token_check=aad.is_valid_token)
    stack.callback(connector.close)
    storage, storage_pid = "", 0
    if need_storage:
        from tools.azurite import Azurite, ensure_resources

        azurite = stack.enter_context(Azurite(in_memory=not queue_traffic))
        ensure_resources(azurite.connection_string, [], ["conversation-references"])
        storage = azurite.connection_string
        storage_pid = azurite.process.pid if azurite.process else 0
    token = identity.channel.mint_channel_token(app_id, connector.url, lifetime=6 * 3600)
    return Services(
        app_id=app_id,
        secret=secret,
        channel_metadata=identity.channel.metadata_url,
        emulator_metadata=identity.emulator.metadata_url,
        jwks=identity.channel.jwks_url,
        aad_url=aad.url,
        ca_path=str(trust_store),
        connector_url=connector.url,
        token=token,
        storage=storage,
        connector=connector,
        storage_pid=storage_pid,
        tokens_issued=lambda: aad.issued[app_id],
    )


# --- one bot's server -----------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    target: Target
    port: int
    process: subprocess.Popen[bytes]
    spawned: float  # perf_counter just before the spawn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/messages"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def memory_kib(self) -> dict[str, int]:
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        values = {}
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                values[name] = int(rest.split()[0])
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def spawn(
    target: Target,
    services: Services,
    *,
    functions: Sequence[str] = ("messages_function",),
    extra: Mapping[str, str] | None = None,
) -> Server:
    from tools.azurite import free_port

    port = free_port()
    if target.key == "ours":
        args = [str(target.python), "-m", "tools.devhost", "--port", str(port)]
        args += ["--functions", *functions]
    else:
        args = [str(target.python), "-m", target.module]
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{target.key}.log", "ab") as log:
        spawned = time.perf_counter()
        env = {**services.env(target, port), **(extra or {})}
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
    return Server(target, port, process, spawned)


def conversation_of(run: str, n: int, workload: str = "mixed") -> dict[str, Any]:
    """The conversation message ``n`` of a run goes to (:func:`activity`), and its echo."""
    if workload == "shared" or (n % 2 == 0 and workload != "new"):
        return {
            "id": f"shared-{(n // 2) % SHARED_CONVERSATIONS}",
            "isGroup": True,
            "conversationType": "groupChat",
        }
    return {"id": f"new-{run}-{n}", "conversationType": "personal"}


def activity(services: Services, run: str, n: int, workload: str = "mixed") -> dict[str, Any]:
    """Message ``n`` of a run. ``mixed``: even ones to 8 shared group conversations (many
    users), odd ones each to a new 1:1 conversation (one user; a new user for every one).
    ``shared``: all to the 8 group conversations (nothing new for ours to store); ``new``:
    each to a new 1:1 conversation (benchmarks/profile_turn.py)."""
    conversation = conversation_of(run, n, workload)
    user = f"user-{n % 50}" if conversation.get("isGroup") else f"user-{run}-{n}"
    return {
        "type": "message",
        "id": f"{run}-{n}",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "channelId": CHANNEL,
        "serviceUrl": services.connector_url,
        "from": {"id": user, "name": "User"},
        "recipient": {"id": f"28:{services.app_id}", "name": "Bot"},
        "conversation": conversation,
        "locale": "en-US",
        "text": f"m-{run}-{n}",
        "textFormat": "plain",
    }


def headers(services: Services) -> dict[str, str]:
    return {"Authorization": f"Bearer {services.token}", "Content-Type": "application/json"}


# --- cold start -------------------------------------------------------------------------------


async def wait_listening(server: Server) -> float:
    """Wait until the server's port accepts; the perf_counter time it first did."""
    deadline = time.perf_counter() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise BenchmarkError(f"{server.target.key} exited; see {LOGS.name}/")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1.0).close()
            return time.perf_counter()
        except OSError:
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"{server.target.key} did not listen in time") from None
            await asyncio.sleep(0.002)


async def first_echo(server: Server, services: Services) -> dict[str, float]:
    """POST one activity as soon as the port accepts; the times from the spawn, in ms."""
    import aiohttp

    body = json.dumps(activity(services, f"cold{uuid.uuid4().hex[:8]}", 0)).encode()
    listening = await wait_listening(server)
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url, data=body, headers=headers(services)) as r,
    ):
        status = r.status
        await r.read()
        answered = time.perf_counter()
    if not 200 <= status < 300:
        raise BenchmarkError(f"{server.target.key} answered {status} to the first echo")
    return {
        "listening_ms": (listening - server.spawned) * 1000.0,
        "answered_ms": (answered - server.spawned) * 1000.0,
    }


def measure_cold(targets: Sequence[Target], services: Services, repeats: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {t.key: [] for t in targets}
    for round_ in range(repeats + 1):  # the first round warms the page cache, discarded
        # Each round in another order, as the warm runs: no bot always spawns first.
        order = list(targets[round_ % len(targets) :]) + list(targets[: round_ % len(targets)])
        for target in order:
            services.connector.reset()
            server = spawn(target, services)
            try:
                times = asyncio.run(first_echo(server, services))
                stats = _settled(services.connector, expected=1)
            finally:
                server.stop()
            if stats["distinct"] != 1 or stats["authorized"] != 1:
                raise BenchmarkError(f"{target.key}: first echo not received with a token: {stats}")
            if round_:
                samples[target.key].append(times)
    return {
        key: {
            metric: _stats([s[metric] for s in runs]) for metric in ("listening_ms", "answered_ms")
        }
        for key, runs in samples.items()
    }


# --- warm throughput --------------------------------------------------------------------------


async def load(
    server: Server,
    services: Services,
    run: str,
    concurrency: int,
    seconds: float,
    workload: str = "mixed",
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    answered: set[str] = set()  # the numbers of the activities answered 2xx
    sent = 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                n = sent
                sent += 1
                body = json.dumps(activity(services, run, n, workload)).encode()
                started = time.perf_counter()
                async with session.post(server.url, data=body, headers=headers(services)) as r:
                    await r.read()
                    latencies.append(time.perf_counter() - started)
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if 200 <= r.status < 300:
                        answered.add(str(n))

        storage0 = services.storage_cpu_seconds()
        cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu1, wall1 = server.cpu_seconds(), time.perf_counter()
        storage1 = services.storage_cpu_seconds()
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    latencies.sort()
    return {
        "sent": sent,
        "ok": ok,
        "answered": answered,  # taken out before the result is stored
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "activities_per_s": ok / (wall1 - wall0),
        "p50_ms": _percentile(latencies, 50) * 1000.0,
        "p99_ms": _percentile(latencies, 99) * 1000.0,
        "cpu_ms_per_activity": (cpu1 - cpu0) * 1000.0 / max(ok, 1),
        # The storage emulator's CPU on the same cores (only ours writes to it): not in the
        # figure above, which is the bot's process alone, as it is for the SDKs.
        "storage_cpu_ms_per_activity": (storage1 - storage0) * 1000.0 / max(ok, 1),
    }


def measure_warm(
    targets: Sequence[Target],
    services: Services,
    repeats: int,
    concurrencies: Sequence[int],
    seconds: float,
    workload: str = "mixed",
) -> dict[str, Any]:
    servers = {t.key: spawn(t, services) for t in targets}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        t.key: {c: [] for c in concurrencies} for t in targets
    }
    try:
        for server in servers.values():
            asyncio.run(first_echo(server, services))
        for repeat in range(repeats):
            for concurrency in concurrencies:
                order = list(targets[repeat % len(targets) :]) + list(
                    targets[: repeat % len(targets)]
                )
                for target in order:
                    run = f"{workload[0]}{repeat}c{concurrency}{target.key}"
                    services.connector.reset()
                    server = servers[target.key]
                    # Warms the connection, under its own run id: its new conversations
                    # are not among the measured run's (ours would have them stored).
                    asyncio.run(load(server, services, f"{run}w", 1, 0.3))
                    services.connector.reset()
                    load_before = os.getloadavg()[0]
                    issued_before = services.tokens_issued()
                    result = asyncio.run(
                        load(server, services, run, concurrency, seconds, workload)
                    )
                    # How often the bot asked the token endpoint (a bot that keeps its
                    # token asks none while warm).
                    result["token_requests"] = services.tokens_issued() - issued_before
                    stats = _settled(services.connector, expected=result["ok"])
                    echoes = _echoes(services.connector.stats(texts=True), run, workload)
                    result["replies_received"] = stats["received"]
                    # Per activity: each one answered 2xx and its echo, by its own text (an
                    # error text, or the echo of one answered 500, never stands in for it).
                    result["lost"] = len(result.pop("answered") - echoes["echoed"])
                    result["duplicated"] = echoes["duplicated"]
                    result["other_texts"] = echoes["other"]
                    result["replies_without_token"] = stats["received"] - stats["authorized"]
                    result["load_average_1m"] = [round(load_before, 2), _load()]
                    runs[target.key][concurrency].append(result)
                    print(
                        f"  {workload:6} {target.key:10} c={concurrency:<3}"
                        f" {result['activities_per_s']:7.1f}/s"
                        f" p50 {result['p50_ms']:6.1f} ms p99 {result['p99_ms']:7.1f} ms"
                        f" cpu {result['cpu_ms_per_activity']:5.2f} ms"
                        f" lost {result['lost']} dup {result['duplicated']}"
                        f" load {result['load_average_1m'][1]}",
                        flush=True,
                    )
        memory = {key: server.memory_kib() for key, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    summary: dict[str, Any] = {}
    for key, by_concurrency in runs.items():
        summary[key] = {
            "peak_rss_mib": round(memory[key].get("VmHWM", 0) / 1024, 1),
            "concurrency": {
                str(c): _summarize(results) for c, results in by_concurrency.items() if results
            },
        }
    return summary


def _summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def median(name: str) -> float:
        return round(statistics.median(r[name] for r in results), 2)

    return {
        "activities_per_s": median("activities_per_s"),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "cpu_ms_per_activity": median("cpu_ms_per_activity"),
        "storage_cpu_ms_per_activity": median("storage_cpu_ms_per_activity"),
        "bot_and_storage_cpu_ms_per_activity": bot_and_storage_cpu({"runs": results}),
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "non_2xx": sum(r["sent"] - r["ok"] for r in results),
        "other_texts": sum(r.get("other_texts", 0) for r in results),
        "replies_without_token": sum(r.get("replies_without_token", 0) for r in results),
        "token_requests_per_activity": (
            round(
                sum(r["token_requests"] for r in results) / max(1, sum(r["ok"] for r in results)), 3
            )
            if all("token_requests" in r for r in results)
            else None
        ),
        "runs": results,
    }


# --- the floor --------------------------------------------------------------------------------


async def measure_floor(services: Services, count: int = 2000) -> dict[str, Any]:
    """One RS256 verification (key already fetched) plus one loopback POST, alone."""
    import aiohttp
    import jwt

    from tools.botsim.identity import JWKS_PATH  # noqa: F401 - the same keys the bots use

    async with aiohttp.ClientSession() as session:
        async with session.get(services.jwks) as r:
            jwks = await r.json()
        key = jwt.PyJWK(jwks["keys"][0]).key
        url = f"{services.connector_url}/v3/conversations/floor/activities"
        body = json.dumps({"type": "message", "text": "floor", "channelId": CHANNEL}).encode()

        async def once() -> None:
            jwt.decode(
                services.token,
                key,
                algorithms=["RS256"],
                audience=services.app_id,
                issuer="https://api.botframework.com",
            )
            async with session.post(url, data=body, headers=headers(services)) as r:
                await r.read()

        for _ in range(100):
            await once()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            await once()
        cpu1, wall1 = time.process_time(), time.perf_counter()
    return {
        "count": count,
        "cpu_ms_per_activity": round((cpu1 - cpu0) * 1000.0 / count, 3),
        "wall_ms_per_activity": round((wall1 - wall0) * 1000.0 / count, 3),
        "note": "client side only: PyJWT verification + aiohttp POST, in the benchmark process",
    }


# --- helpers ----------------------------------------------------------------------------------


def _echoes(stats: Mapping[str, Any], run: str, workload: str = "mixed") -> dict[str, Any]:
    """The replies that echo one of the run's messages (``m-<run>-<n>``) in the
    conversation that message was sent to, each counted once (``distinct``) and beyond
    once (``duplicated``); ``other``: replies that echo none of them (an apology, an
    error text) or echo one in another conversation (its message is then not echoed)."""
    pattern = re.compile(rf"\bm-{re.escape(run)}-(\d+)\b")
    seen: Counter[str] = Counter()
    other = 0
    for key, count in (stats.get("texts") or {}).items():
        conversation, _, text = key.partition("|")
        found = pattern.search(text)
        if found is None or conversation != conversation_of(run, int(found[1]), workload)["id"]:
            other += count
        else:
            seen[found.group(1)] += count
    return {
        "distinct": len(seen),
        "duplicated": sum(n - 1 for n in seen.values()),
        "other": other,
        "echoed": set(seen),
    }


def _settled(connector: ConnectorProcess, expected: int, timeout: float = 10.0) -> dict[str, Any]:
    """The connector's counts once every expected reply arrived (or none came for 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = connector.stats()
        idle = stats.get("idle_for")
        if stats["distinct"] >= expected or time.monotonic() > deadline:
            return stats
        if idle is not None and idle > 1.0:
            return stats
        time.sleep(0.05)


def _percentile(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, -(-pct * len(ordered) // 100) - 1))
    return ordered[int(rank)]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "samples": [round(v, 1) for v in values],
    }


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# --- report -----------------------------------------------------------------------------------


def ratios(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ours / theirs for the Markdown table (higher is better only for throughput)."""
    warm, cold = report.get("warm", {}), report.get("cold", {})
    rows: list[dict[str, Any]] = []

    def row(figure: str, values: Mapping[str, float | None], better: str) -> None:
        rows.append({"figure": figure, "values": dict(values), "better": better})

    for c in report["concurrencies"]:
        row(
            f"warm activities/s, concurrency {c}",
            {k: _dig(warm, k, "concurrency", str(c), "activities_per_s") for k in warm},
            "higher",
        )
    for c in report["concurrencies"]:
        row(
            f"p99 latency ms, concurrency {c}",
            {k: _dig(warm, k, "concurrency", str(c), "p99_ms") for k in warm},
            "lower",
        )

    def cpu_rows(workload: Mapping[str, Any], prefix: str, c: int) -> None:
        # The bot's process alone, then with the storage emulator's CPU (only ours uses it)
        # beside it, where the results recorded that.
        row(
            f"{prefix}CPU ms per activity, the bot's process, concurrency {c}",
            {k: _dig(workload, k, "concurrency", str(c), "cpu_ms_per_activity") for k in workload},
            "lower",
        )
        with_storage = {
            k: bot_and_storage_cpu(_dig(workload, k, "concurrency", str(c))) for k in workload
        }
        if any(v is not None for v in with_storage.values()):
            row(
                f"{prefix}CPU ms per activity, bot + storage (Azurite), concurrency {c}",
                with_storage,
                "lower",
            )

    for c in report["concurrencies"]:
        cpu_rows(warm, "", c)
    shared = report.get("warm_shared_only", {})
    for c in report["concurrencies"] if shared else ():
        row(
            f"group conversations only: activities/s, concurrency {c}",
            {k: _dig(shared, k, "concurrency", str(c), "activities_per_s") for k in shared},
            "higher",
        )
        cpu_rows(shared, "group conversations only: ", c)
    row("peak RSS MiB", {k: warm[k]["peak_rss_mib"] for k in warm}, "lower")
    # Every measured run's replies, both workloads.
    workloads = [w for w in (warm, shared) if w]
    both = ", both workloads" if shared else ""
    row(
        f"lost + duplicated replies, non-2xx answers, other texts{both}",
        {
            k: sum(
                v["lost"] + v["duplicated"] + v["non_2xx"] + v.get("other_texts", 0)
                for w in workloads
                for v in w.get(k, {}).get("concurrency", {}).values()
            )
            for k in warm
        },
        "lower",
    )
    checked = report.get("token_check")
    row(
        (
            "replies without a token the fake AAD issued"
            if checked
            else "replies without a Bearer header (tokens unchecked)"
        )
        + both,
        {
            k: sum(
                r.get("replies_without_token", 0)
                for w in workloads
                for v in w.get(k, {}).get("concurrency", {}).values()
                for r in v.get("runs", [])
            )
            for k in warm
        },
        "lower",
    )
    # The targets' concurrency (8) when it was measured.
    c = 8 if 8 in report["concurrencies"] else report["concurrencies"][0]
    requests = {
        k: _dig(warm, k, "concurrency", str(c), "token_requests_per_activity") for k in warm
    }
    if any(v is not None for v in requests.values()):
        row(f"token requests per activity, concurrency {c}", requests, "lower")
    row("spawn → port accepts, ms", {k: cold[k]["listening_ms"]["median"] for k in cold}, "lower")
    row(
        "spawn → first authenticated echo answered, ms",
        {k: cold[k]["answered_ms"]["median"] for k in cold},
        "lower",
    )
    return rows


def bot_and_storage_cpu(level: Mapping[str, Any] | None) -> float | None:
    """CPU ms per activity of the bot's process and the storage emulator together, the
    median of the runs' sums (None: the results did not record the emulator's)."""
    if not level:
        return None
    if "bot_and_storage_cpu_ms_per_activity" in level:
        return level["bot_and_storage_cpu_ms_per_activity"]
    runs = level.get("runs") or []
    if not runs or any("storage_cpu_ms_per_activity" not in r for r in runs):
        return None
    return round(
        statistics.median(
            r["cpu_ms_per_activity"] + r["storage_cpu_ms_per_activity"] for r in runs
        ),
        2,
    )


def _dig(data: Mapping[str, Any], *path: str) -> Any:
    for name in path:
        if not isinstance(data, Mapping) or name not in data:
            return None
        data = data[name]
    return data


def markdown(report: Mapping[str, Any]) -> str:
    keys = [k for k in TARGETS if k in report.get("warm", {}) or k in report.get("cold", {})]
    peers = [k for k in keys if k != "ours"]
    machine = report["machine"]
    lines = [
        f"Generated {report['generated']} by `{report['command']}`: {machine['cpus']} cores,"
        f" {machine['platform']}, Python {machine['python']}; load average (1 min)"
        f" {machine['load_average_1m']['start']} at the start,"
        f" {machine['load_average_1m']['end']} at the end (the machine is shared).",
        "",
        "| figure | "
        + " | ".join(TARGETS[k].label for k in keys)
        + " | "
        + " | ".join(f"ours / {TARGETS[k].label.split(' ')[0]}" for k in peers)
        + " |",
        "|---|" + "---:|" * (len(keys) + len(peers)),
    ]
    for r in ratios(report):
        values = r["values"]
        if not values:
            continue
        cells = [_fmt(values.get(k)) for k in keys]
        ours = values.get("ours")
        shares = []
        for k in peers:
            theirs = values.get(k)
            shares.append(f"{ours / theirs:.2f}" if ours is not None and theirs else "—")
        lines.append(
            f"| {r['figure']} ({r['better']} is better) | " + " | ".join(cells + shares) + " |"
        )
    if report.get("cold") and "trust_store" not in report:
        lines += [
            "",
            "The cold rows of this run were measured with every bot trusting the fake AAD's"
            " CA certificate alone: each TLS context loaded one certificate instead of the"
            " system's store, so they are about 80-100 ms lower than with it (the ratios"
            " within a few per cent). Runs since give every bot the system's certificates"
            " plus the fake AAD's (benchmarks/trust.py).",
        ]
    floor = report.get("floor")
    if floor:
        lines += [
            "",
            f"The floor (one RS256 verification + one loopback POST, client side, alone):"
            f" {floor['cpu_ms_per_activity']} ms CPU, {floor['wall_ms_per_activity']} ms wall"
            " per activity.",
        ]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def chart(report_path: Path, png: Path, *options: str) -> None:
    """A PNG chart (benchmarks/chart.py; ``options`` before its arguments), drawn in
    .tools/bench-report (matplotlib stays out of .venv)."""
    venv = TOOLS / "bench-report"
    python = venv / "bin" / "python"
    requirements = ROOT / "benchmarks" / "requirements-report.txt"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)], check=True
        )
    subprocess.run(
        [str(python), "-m", "benchmarks.chart", *options, str(report_path), str(png)],
        cwd=ROOT,
        check=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured run")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument(
        "--no-install", action="store_true", help="use the peers' venvs as they are"
    )
    parser.add_argument("--chart", action="store_true", help="also draw results/warm.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it all work?")
    parser.add_argument(
        "--shared-only",
        action="store_true",
        help="also measure a workload of group conversations only (nothing new to store)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "warm.json")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only rewrite the table (.md beside --output) from --output's results, and"
        " with --chart the PNG",
    )
    args = parser.parse_args(argv)
    if args.table_only:
        table = markdown(json.loads(args.output.read_text()))
        args.output.with_suffix(".md").write_text(table)
        print(table)
        if args.chart:
            chart(args.output, args.output.with_suffix(".png"))
        return 0
    if args.smoke:
        args.repeats, args.seconds, args.concurrency = 1, 0.5, "1,4"
    targets = [TARGETS[k.strip()] for k in args.targets.split(",") if k.strip()]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not args.no_install:
        for target in targets:
            ensure_venv(target)
    report: dict[str, Any] = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.warm " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": {"start": _load(), "end": None},
        },
        "channel": CHANNEL,
        # What makes a reply authorized (replies_without_token counts the others).
        "token_check": "a token the fake AAD issued for the Connector, unexpired",
        "trust_store": "the system's CA certificates + the fake AAD's (benchmarks/trust.py)",
        "repeats": args.repeats,
        "seconds_per_run": args.seconds,
        "concurrencies": concurrencies,
        "versions": {t.key: versions(t) for t in targets},
    }
    try:
        with ExitStack() as stack:
            services = start_services(stack, need_storage=any(t.key == "ours" for t in targets))
            if not args.no_cold:
                print("cold start ...", flush=True)
                report["cold"] = measure_cold(targets, services, args.repeats)
            print("warm ...", flush=True)
            report["warm"] = measure_warm(
                targets, services, args.repeats, concurrencies, args.seconds
            )
            if args.shared_only:
                print("warm, group conversations only ...", flush=True)
                report["warm_shared_only"] = measure_warm(
                    targets, services, args.repeats, concurrencies, args.seconds, "shared"
                )
            services.connector.reset()
            report["floor"] = asyncio.run(measure_floor(services, 200 if args.smoke else 2000))
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report["machine"]["load_average_1m"]["end"] = _load()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.output.with_suffix(".md").write_text(table)
    print()
    print(table)
    if args.chart:
        chart(args.output, args.output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
