"""`make bench`'s own two measures of this bot, run with tiny sizes so they cannot rot.

Each runs as `make bench` runs it, a process of its own with its own Azurite, botsim's
services and the repo's local host, and writes its results where it is told. The peers
(the SDKs in their own venvs) are left out: installing them is `make bench`'s business.
What is checked is what the benchmark reports a user would act on: every echo answered
and received once, every conversation of the broadcast reached exactly once (and the
pacing trace it can write saw every send).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


BENCHMARK_SECONDS = 100.0  # each run takes seconds; past this it is interrupted


def run_benchmark(module: str, *args: str, output: Path) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS --output OUTPUT`` and return the results it wrote. Past
    BENCHMARK_SECONDS, interrupt it so that it stops what it started (its Azurite, hosts
    and fake Connector), then fail."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--output", str(output)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = process.communicate(timeout=BENCHMARK_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the benchmark's own clean-up runs
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        pytest.fail(f"{module} did not finish within {BENCHMARK_SECONDS:.0f} s")
    assert process.returncode == 0, err[-3000:]
    return json.loads(output.read_text())


@pytest.mark.timeout(150)
def test_the_warm_benchmark_measures_this_bot_with_every_reply_received_once(tmp_path):
    report = run_benchmark(
        "benchmarks.warm", "--smoke", "--targets", "ours", "--no-cold", output=tmp_path / "w.json"
    )
    measured = report["warm"]["ours"]["concurrency"]
    assert sorted(measured) == ["1", "4"]
    for level in measured.values():
        assert level["activities_per_s"] > 0
        assert (level["lost"], level["duplicated"], level["non_2xx"]) == (0, 0, 0)
        assert level["other_texts"] == 0
    assert report["floor"]["cpu_ms_per_activity"] > 0


@pytest.mark.timeout(150)
def test_the_broadcast_benchmark_reaches_every_conversation_exactly_once(tmp_path):
    report = run_benchmark(
        "benchmarks.broadcast",
        *("--conversations", "40", "--processes", "1", "--timeout", "80"),
        *("--trace", str(tmp_path / "trace")),
        output=tmp_path / "b.json",
    )
    (run,) = report["runs"]
    assert (run["state"], run["targets"], run["delivered"], run["failed"]) == ("done", 40, 40, 0)
    assert (run["received"], run["distinct"], run["lost"], run["duplicated"]) == (40, 40, 0, 0)
    # Counted by conversation and text: each stored conversation got the broadcast's text,
    # and no other text reached anyone (one would not stand in for a missed conversation).
    assert (run["connector_delivered"], run["other_texts_received"]) == (40, 0)
    assert run["complete"] and run["conversations"] == 40
    # The pacing trace (--trace) saw every grant and every send the host made.
    (host,) = (tmp_path / "trace").glob("*/host-*.jsonl")
    records = [json.loads(line) for line in host.read_text().splitlines()]
    sends = [r for r in records if r["k"] == "send" and r["path"].endswith("/activities")]
    grants = [r for r in records if r["k"] == "grant"]
    assert len(sends) == 40 and {r["status"] for r in sends} == {200}
    assert len(grants) >= 40 and all(r["bg"] for r in grants)


@pytest.mark.timeout(150)
def test_the_pacing_simulation_writes_every_part_of_its_results(tmp_path):
    # Its parts run for minutes at their full sizes; small ones, one seed, still go through
    # every part, and the results name the pacer's constants they ran with.
    report = run_benchmark(
        "benchmarks.pacing_instances",
        *("--instances", "2,8", "--limits", "50", "--seconds", "12"),
        *("--messages", "200", "--seeds", "1"),
        output=tmp_path / "p.json",
    )
    assert [row["instances"] for row in report["sharing_a_tenant"]] == [2, 8]
    assert report["one_left_after_20_share_per_half_minute"]
    two = [(row["instances"], row["put_back"]) for row in report["serving_two_tenants"]]
    assert two == [(2, False), (2, True), (8, False), (8, True)]
    one = report["one_tenant_over_many"]
    assert [(row["instances"], row["room"]) for row in one] == [(8, False), (8, True)]
    assert all(0 < row["share_of_limit"][0] <= 1 for row in one)
    assert report["pacer"]["room_seconds"] > 0 and report["messages"] == 200
