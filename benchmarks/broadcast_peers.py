"""The SDKs' own proactive loops over the same conversations, Teams' limits enforced.

    .venv/bin/python -m benchmarks.broadcast_peers [--conversations 10000]
        [--peers botbuilder,agents,teams] [--concurrency 1,32] [--tenant-limit 50]
    .venv/bin/python -m benchmarks.broadcast_peers --table-only [--chart]  # from the JSONs

The comparison for benchmarks/broadcast.py: the same ``--conversations`` Teams channel
conversations in 2 tenants (the references ``broadcast.reference`` builds), the same
fake Connector (benchmarks/connector_process.py with ``--teams-limits --tenant-limit``:
Teams' windows per conversation, ``--tenant-limit`` requests/s per tenant, 429 with
``Retry-After: 1`` beyond), the same botsim identity services and HTTPS fake AAD. Each
SDK sends the same text to every conversation the way its docs show a bot author doing
it, in its own venv (.tools/bench-<peer>, made as benchmarks/warm.py makes them):

- Bot Framework SDK 4.17.1: ``CloudAdapter.continue_conversation`` (peers/botbuilder_broadcast.py);
- Microsoft 365 Agents SDK 1.9.0: its ``CloudAdapter.continue_conversation``
  (peers/agents_broadcast.py);
- Microsoft Teams SDK for Python 2.1.1: ``app.send(conversation_id, ...)`` after
  ``app.initialize()`` (peers/teams_broadcast.py).

The SDKs keep no store of conversation references, so the references are written to a
JSON file (a list of ConversationReference objects, .tools/bench-logs/) that each
peer's loop reads before it starts: reading them is not part of what is timed. Each
``--concurrency`` value is one run per peer: 1 is a plain sequential loop (the SDKs'
samples), N > 1 an ``asyncio.gather`` with at most N sends in flight.

Recorded per run, counted at the fake Connector: sends/s (conversations that received
the text, over the loop's wall time) against the enforced rate, delivered, lost (never
received: the SDKs keep no outbox, so a send that failed is gone), duplicated, 429s
received, whether the SDK retried a 429 (429s drawn vs sends that failed with 429),
CPU per delivered send (the loop process's user + system time during the loop) and its
peak RSS, which includes the references it loaded (what loading them added to its RSS
is recorded apart: ours reads them from storage a page at a time). Results:
benchmarks/results/broadcast_peers.json; benchmarks/results/broadcast.md is the table of
both, ours from benchmarks/results/broadcast.json (its run with one
host process), with the ratios ours / theirs; ``--chart`` also draws
benchmarks/results/broadcast.png from them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import broadcast, warm

PEERS = ("botbuilder", "agents", "teams")
RESULTS = warm.RESULTS / "broadcast_peers.json"
OURS = warm.RESULTS / "broadcast.json"
TABLE = warm.RESULTS / "broadcast.md"


def write_references(path: Path, service_url: str, app_id: str, count: int) -> None:
    references = [broadcast.reference(service_url, app_id, n) for n in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(references))


def write_tenants(path: Path, count: int) -> None:
    """conversation id -> tenant, for the fake Connector's tenant limit."""
    conversations = (broadcast.reference("", "", n)["conversation"] for n in range(count))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({c["id"]: c["tenantId"] for c in conversations}))


def mode(concurrency: int) -> str:
    return "sequential loop" if concurrency <= 1 else f"asyncio.gather, {concurrency} in flight"


def count_texts(stats: Mapping[str, Any], text: str) -> dict[str, Any]:
    """What the fake Connector received of ``text``, per conversation, and what else.

    ``texts`` and ``throttled_texts`` map ``conversation|text`` to how many times it was
    received (2xx) and answered 429. A conversation answered 429 that received the text
    anyway was sent it again by the SDK; one that never received it lost it.
    """
    received: Mapping[str, int] = stats.get("texts") or {}
    throttled: Mapping[str, int] = stats.get("throttled_texts") or {}
    suffix = f"|{text}"
    sent = {key: n for key, n in received.items() if key.endswith(suffix)}
    throttled_sent = [key for key in throttled if key.endswith(suffix)]
    others = {key: n for key, n in received.items() if not key.endswith(suffix)}
    sample = sorted({key.split("|", 1)[1][:120] for key in others})[:3]
    return {
        "delivered": len(sent),
        "duplicated": sum(n - 1 for n in sent.values()),
        "conversations_429": len(throttled_sent),
        "retried_after_429": sum(1 for key in throttled_sent if key in sent),
        "lost_to_429": sum(1 for key in throttled_sent if key not in sent),
        "other_texts": sum(others.values()),
        "other_sample": sample,
    }


def retries_429(counted: Mapping[str, Any]) -> str:
    """Whether the SDK sent a message again after a 429 (from what the Connector saw)."""
    if counted["conversations_429"] == 0:
        return "not exercised (no 429 drawn)"
    if counted["lost_to_429"] == 0:
        return "yes"
    if counted["retried_after_429"] == 0:
        return "no"
    return "partly (some retried, some lost)"


def environment(target: warm.Target, services: warm.Services) -> dict[str, str]:
    """The peer's settings as benchmarks/warm.py gives its server; for the Teams SDK also
    its SERVICE_URL setting (the Connector ``app.send`` posts to), botsim's Connector."""
    env = services.env(target, 0)
    if target.key == "teams":
        env["SERVICE_URL"] = services.connector_url
    return env


def run_peer(
    target: warm.Target,
    services: warm.Services,
    references: Path,
    count: int,
    concurrency: int,
    enforced_rate: int,
    timeout: float,
) -> dict[str, Any]:
    services.connector.reset()
    text = f"news {uuid.uuid4().hex[:8]}"
    args = [str(target.python), "-m", f"benchmarks.peers.{target.key}_broadcast"]
    args += [str(references), text, str(concurrency)]
    warm.LOGS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with open(warm.LOGS / f"{target.key}-broadcast.log", "ab") as log:
        done = subprocess.run(
            args,
            cwd=warm.ROOT,
            env=environment(target, services),
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=timeout,
            check=False,
        )
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise warm.BenchmarkError(
            f"{target.key}'s loop exited with {done.returncode};"
            f" see {warm.LOGS.name}/{target.key}-broadcast.log"
        )
    loop = json.loads(lines[-1])
    warm._settled(services.connector, expected=count, timeout=5.0)
    stats = services.connector.stats(texts=True)
    counted = count_texts(stats, text)
    delivered = counted["delivered"]
    sends_per_s = delivered / loop["seconds"] if loop["seconds"] else 0.0
    return {
        "peer": target.key,
        "label": target.label,
        "concurrency": concurrency,
        "mode": mode(concurrency),
        "seconds": loop["seconds"],
        "sends_per_s": round(sends_per_s, 1),
        "achieved_share_of_enforced": round(sends_per_s / enforced_rate, 3)
        if enforced_rate
        else None,
        "attempted": loop["attempted"],
        "attempts_per_s": round(loop["attempted"] / loop["seconds"], 1) if loop["seconds"] else 0.0,
        "failed_in_loop": loop["failed"],
        "failures": loop["failures"],
        "delivered": delivered,
        "lost": count - delivered,
        "duplicated": counted["duplicated"],
        "throttled_429": stats["throttled"],
        "share_429": round(stats["throttled"] / (stats["received"] + stats["throttled"]), 4)
        if stats["received"] + stats["throttled"]
        else 0.0,
        "conversations_429": counted["conversations_429"],
        "retried_after_429": counted["retried_after_429"],
        "lost_to_429": counted["lost_to_429"],
        "retries_429": retries_429(counted),
        "other_texts_received": counted["other_texts"],
        "other_texts_sample": counted["other_sample"],
        "replies_without_token": stats["received"] - stats["authorized"],
        "cpu_seconds": loop["cpu_seconds"],
        "cpu_ms_per_send": round(loop["cpu_seconds"] * 1000 / max(1, delivered), 2),
        "cpu_ms_per_attempt": round(loop["cpu_seconds"] * 1000 / max(1, loop["attempted"]), 2),
        "peak_rss_mib": loop["peak_rss_mib"],  # the references it loaded included
        "references_rss_mib": loop.get("references_rss_mib"),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def measure(
    peers: Sequence[str],
    concurrencies: Sequence[int],
    count: int,
    tenant_limit: int | None,
    timeout: float,
) -> list[dict[str, Any]]:
    """One run per concurrency and peer; ``tenant_limit`` None: no limits enforced."""
    # Teams counts a request against its conversation's tenant; the Bot Framework and
    # Teams SDKs' bodies do not name it, so the fake Connector is told each conversation's.
    tenants = warm.LOGS / f"broadcast-tenants-{uuid.uuid4().hex[:8]}.json"
    limits: list[str] = []
    if tenant_limit:
        write_tenants(tenants, count)
        limits = ["--teams-limits", "--tenant-limit", str(tenant_limit)]
        limits += ["--conversation-tenants", str(tenants)]
    enforced = (tenant_limit or 0) * len(broadcast.TENANTS)
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        stack.callback(tenants.unlink, missing_ok=True)
        services = warm.start_services(stack, need_storage=False, connector_args=limits)
        references = warm.LOGS / f"broadcast-references-{uuid.uuid4().hex[:8]}.json"
        write_references(references, services.connector_url, services.app_id, count)
        stack.callback(references.unlink, missing_ok=True)
        for concurrency in concurrencies:
            for key in peers:
                limited = "" if tenant_limit else ", no limits enforced"
                print(f"{key}: {mode(concurrency)}{limited}, {count} conversations", flush=True)
                result = run_peer(
                    warm.TARGETS[key], services, references, count, concurrency, enforced, timeout
                )
                print(json.dumps(result), flush=True)
                runs.append(result)
    return runs


# --- the table ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours is not None and theirs else "—"


def _ours_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run of broadcast.py in the peers' terms."""
    tried = run.get("received", 0) + run.get("throttled_429", 0)
    return {
        **run,
        # Counted at the Connector, as the peers' are (runs before it was recorded: the
        # report's count).
        "delivered": run.get("connector_delivered", run.get("delivered")),
        # Not recorded by runs before broadcast.py counted by conversation and text.
        "other_texts_received": run.get("other_texts_received"),
        "attempts_per_s": round(tried / run["seconds"], 1) if run.get("seconds") else None,
        "cpu_ms_per_send": run.get("host_cpu_ms_per_send"),
        "retries_429": _ours_retries_429(run),
        "peak_rss_mib": max(run.get("peak_rss_mib") or [0]),
    }


def _ours_retries_429(run: Mapping[str, Any]) -> str:
    """As :func:`retries_429` judges the peers: from the 429s this run drew and whether
    every conversation still got its message."""
    if not run.get("throttled_429"):
        return "not exercised (no 429 drawn)"
    return "yes" if not run.get("lost") else "partly (some retried, some lost)"


def _table(
    rows: Sequence[tuple[str, Mapping[str, Any]]], base: Mapping[str, Any] | None
) -> list[str]:
    lines = [
        "| run | delivered/s | share of enforced | sends tried/s | delivered | lost |"
        " duplicated | 429s | retries a 429 | other texts to users | CPU ms per delivered send |"
        " peak RSS MiB (peers: with the references loaded) | delivered/s ours / theirs |"
        " CPU per send ours / theirs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows:
        ours_row = base is None or name.startswith("ours")
        share = row.get("achieved_share_of_enforced")
        cells = [
            _fmt(row.get("sends_per_s")),
            "—" if share is None else f"{share * 100:.0f} %",
            _fmt(row.get("attempts_per_s")),
            _fmt(row.get("delivered")),
            _fmt(row.get("lost")),
            _fmt(row.get("duplicated")),
            _fmt(row.get("throttled_429")),
            str(row.get("retries_429")),
            _fmt(row.get("other_texts_received")),
            _fmt(row.get("cpu_ms_per_send")),
            _fmt(row.get("peak_rss_mib")),
            "" if ours_row else _ratio(base["sends_per_s"], row.get("sends_per_s")),
            "" if ours_row else _ratio(base["cpu_ms_per_send"], row.get("cpu_ms_per_send")),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _references_note(peers: Mapping[str, Any]) -> str:
    """What the peers' peak RSS holds that ours' does not: the references they load."""
    runs = [*peers.get("runs", []), *peers.get("unthrottled", [])]
    measured = [r["references_rss_mib"] for r in runs if r.get("references_rss_mib") is not None]
    count = f"{peers['conversations']:,}"
    if measured:
        low, high = min(measured), max(measured)
        size = f"{low:.1f} MiB" if low == high else f"{low:.1f}-{high:.1f} MiB"
        added = f"what loading them added to its RSS, {size}, is in broadcast_peers.json"
    else:
        added = (
            "not measured in this run; loading 10,000 of them adds about 16 MiB to a Python"
            " process's RSS"
        )
    return (
        f"A peer's peak RSS includes the {count} references its loop loads as input before it"
        f" starts (a JSON list of ConversationReference objects; {added}); ours never holds"
        " them all: its fan-out reads them from storage a page at a time."
    )


def markdown(peers: Mapping[str, Any], ours: Mapping[str, Any] | None) -> str:
    """One row per run (ours first), with the ratios ours / theirs for rate and CPU; the
    runs with no limits enforced in a second table."""
    machine = peers["machine"]
    lines = [
        f"Broadcast to {peers['conversations']:,} Teams conversations in {peers['tenants']}"
        f" tenants, the fake Connector enforcing Teams' windows per conversation and"
        f" {peers['tenant_limit_per_s']} requests/s per tenant ({peers['enforced_rate_per_s']}/s"
        " in all), 429 with `Retry-After: 1` beyond.",
        "",
        f"Peers: generated {peers['generated']} by `{peers['command']}` ({machine['cpus']}"
        f" cores, Python {machine['python']}, load average {machine['load_average_1m_start']}"
        f" at the start, {machine['load_average_1m_end']} at the end; the machine is shared).",
    ]
    base: dict[str, Any] | None = None
    rows: list[tuple[str, Mapping[str, Any]]] = []
    ours_unthrottled: dict[str, Any] | None = None
    if ours:
        lines.append(
            f"Ours: generated {ours['generated']} by `{ours['command']}` (load average"
            f" {ours['machine']['load_average_1m_start']} at the start)."
        )
        if ours.get("conversations") != peers["conversations"]:
            lines.append(
                f"**Not the same size**: ours broadcast to {ours.get('conversations'):,}"
                f" conversations, the peers to {peers['conversations']:,}."
            )
        for run in ours.get("runs", []):
            row = _ours_row(run)
            processes = run["processes"]
            rows.append((f"ours, queue pipeline, {processes} host process(es)", row))
            if processes == 1:
                base = row
        if ours.get("unthrottled"):
            ours_unthrottled = _ours_row(ours["unthrottled"])
        ours_runs = [
            *ours.get("runs", []),
            *([ours["unthrottled"]] if ours.get("unthrottled") else []),
        ]
        if any("connector_delivered" not in run for run in ours_runs):
            lines.append(
                "Ours' runs there predate counting by conversation and text: their delivered is"
                " the report's, lost and duplicated come from the distinct conversation + text"
                " pairs the Connector received (a conversation missed and another text sent"
                " elsewhere would cancel out), and other texts were not recorded (—)."
            )
    rows += [(f"{run['label']}, {run['mode']}", run) for run in peers["runs"]]
    lines += [
        "",
        "Ratios are ours (1 host process) / theirs. CPU per send: the process that sends"
        " (ours: the host, without Azurite's CPU, which is in broadcast.json); peak RSS:"
        " that process's (ours: the largest host's). " + _references_note(peers),
        "",
        *_table(rows, base),
    ]
    if peers.get("unthrottled"):
        free: list[tuple[str, Mapping[str, Any]]] = []
        if ours_unthrottled:
            free.append(("ours, queue pipeline, 1 host process", ours_unthrottled))
        free += [(f"{run['label']}, {run['mode']}", run) for run in peers["unthrottled"]]
        lines += [
            "",
            "No limits enforced (ratios against ours with no limits, 1 host process):",
            "",
            *_table(free, ours_unthrottled),
        ]
    return "\n".join(lines) + "\n"


def chart_series(peers: Mapping[str, Any], ours: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the broadcast chart shows (benchmarks/chart.py draws it, in a venv with
    matplotlib and nothing else): per run, delivered/s, the share of the conversations
    that never received the text, and CPU per delivered send (ours: the host's, and
    Azurite's beside it); the runs with no limits enforced apart."""

    def bar(label: str, row: Mapping[str, Any]) -> dict[str, Any]:
        delivered, lost = row.get("delivered") or 0, row.get("lost") or 0
        return {
            "label": label,
            "delivered_per_s": row.get("sends_per_s"),
            "lost_percent": round(100.0 * lost / (delivered + lost), 1) if delivered + lost else 0,
            "cpu_ms_per_send": row.get("cpu_ms_per_send"),
            "storage_cpu_ms_per_send": 0.0,
        }

    def ours_bar(label: str, run: Mapping[str, Any]) -> dict[str, Any]:
        # Never received, of the conversations targeted: what the report calls delivered
        # but the Connector never saw, and what the report gave up on, alike.
        targets = run.get("conversations") or run.get("targets") or 0
        # Runs before broadcast.py counted by conversation and text: distinct pairs.
        reached = run.get("connector_delivered", run.get("distinct")) or 0
        missed = max(0, targets - reached)
        return {
            **bar(label, _ours_row(run)),
            "lost_percent": round(100.0 * missed / targets, 1) if targets else 0,
            "storage_cpu_ms_per_send": run.get("azurite_cpu_ms_per_send") or 0.0,
        }

    def peer_label(run: Mapping[str, Any]) -> str:
        name = run["label"].rsplit(" ", 1)[0]  # without the version
        return f"{name}, {'sequential' if run['mode'] == mode(1) else 'gather'}"

    limited = [
        ours_bar(f"ours, {run['processes']} host(s)", run) for run in (ours or {}).get("runs", [])
    ]
    limited += [bar(peer_label(run), run) for run in peers["runs"]]
    free = []
    if ours and ours.get("unthrottled"):
        free.append(ours_bar("ours, 1 host", ours["unthrottled"]))
    free += [bar(peer_label(run), run) for run in peers.get("unthrottled", [])]
    machine = peers["machine"]
    return {
        "title": (
            f"Broadcast to {peers['conversations']:,} Teams conversations, {peers['generated']},"
            f" {machine['cpus']} cores, load {machine['load_average_1m_start']}"
            f"-{machine['load_average_1m_end']}"
        ),
        "enforced_rate_per_s": peers["enforced_rate_per_s"],
        "limited": limited,
        "unthrottled": free,
    }


def write_chart(peers_path: Path, ours_path: Path, png: Path) -> None:
    peers = json.loads(peers_path.read_text())
    ours = json.loads(ours_path.read_text()) if ours_path.exists() else None
    series = warm.TOOLS / "bench-logs" / "broadcast_chart.json"
    series.parent.mkdir(parents=True, exist_ok=True)
    series.write_text(json.dumps(chart_series(peers, ours)))
    warm.chart(series, png, "--broadcast")


def write_table(peers_path: Path, ours_path: Path, table: Path) -> str:
    peers = json.loads(peers_path.read_text())
    ours = json.loads(ours_path.read_text()) if ours_path.exists() else None
    text = markdown(peers, ours)
    table.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.broadcast_peers", description=__doc__
    )
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument(
        "--concurrency", default="1,32", help="1: sequential; N: gather, N in flight"
    )
    parser.add_argument("--tenant-limit", type=int, default=50)
    parser.add_argument(
        "--unthrottled",
        action="store_true",
        help="also one run per peer with no limits enforced, at the highest --concurrency",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per loop, seconds")
    parser.add_argument(
        "--no-install", action="store_true", help="use the peers' venvs as they are"
    )
    parser.add_argument("--table-only", action="store_true", help="only rewrite broadcast.md")
    parser.add_argument(
        "--chart", action="store_true", help="also draw results/broadcast.png (with the table)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--ours", type=Path, default=OURS, help="broadcast.py's results")
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    if args.table_only:
        print(write_table(args.output, args.ours, args.table))
        if args.chart:
            write_chart(args.output, args.ours, args.table.with_suffix(".png"))
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in peers if p not in PEERS]:
        parser.error(f"unknown peers: {', '.join(unknown)} (choose from {', '.join(PEERS)})")
    if not args.no_install:
        for key in peers:
            warm.ensure_venv(warm.TARGETS[key])
    report: dict[str, Any] = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.broadcast_peers " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_start": round(os.getloadavg()[0], 2),
        },
        "references": "a JSON file of ConversationReference objects, read before the loop",
        "conversations": args.conversations,
        "tenants": len(broadcast.TENANTS),
        "tenant_limit_per_s": args.tenant_limit,
        "enforced_rate_per_s": args.tenant_limit * len(broadcast.TENANTS),
        "versions": {key: warm.versions(warm.TARGETS[key]) for key in peers},
    }
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        report["runs"] = measure(
            peers, concurrencies, args.conversations, args.tenant_limit, args.timeout
        )
        if args.unthrottled:
            report["unthrottled"] = measure(
                peers, [max(concurrencies)], args.conversations, None, args.timeout
            )
    except (warm.BenchmarkError, subprocess.TimeoutExpired) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(write_table(args.output, args.ours, args.table))
    if args.chart:
        write_chart(args.output, args.ours, args.table.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
