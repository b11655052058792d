"""`make bench`'s own two measures of this bot, run with tiny sizes so they cannot rot.

Each runs as `make bench` runs it, a process of its own with its own Azurite, botsim's
services and the repo's local host, and writes its results where it is told. The peers
(the SDKs in their own venvs) are left out: installing them is `make bench`'s business.
What is checked is what the benchmark reports a user would act on: every echo answered
and received once, every conversation of the broadcast reached exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGS``; past ``timeout``, interrupt it so that it stops what it
    started (its Azurite, hosts and fake Connector), then fail."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # the benchmark's own clean-up runs
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        pytest.fail(f"{args[0]} did not finish within {timeout:.0f} s")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.timeout(150)
def test_the_warm_benchmark_measures_this_bot_with_every_reply_received_once(tmp_path):
    output = tmp_path / "warm.json"
    result = run_benchmark(
        "benchmarks.warm",
        "--smoke",
        "--targets",
        "ours",
        "--no-cold",
        "--output",
        str(output),
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    measured = report["warm"]["ours"]["concurrency"]
    assert sorted(measured) == ["1", "4"]
    for level in measured.values():
        assert level["activities_per_s"] > 0
        assert (level["lost"], level["duplicated"], level["non_2xx"]) == (0, 0, 0)
    assert report["floor"]["cpu_ms_per_activity"] > 0


@pytest.mark.timeout(150)
def test_the_broadcast_benchmark_reaches_every_conversation_exactly_once(tmp_path):
    output = tmp_path / "broadcast.json"
    result = run_benchmark(
        "benchmarks.broadcast",
        "--conversations",
        "40",
        "--processes",
        "1",
        "--output",
        str(output),
        "--timeout",
        "80",
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(output.read_text())["runs"]
    assert (run["state"], run["targets"], run["delivered"], run["failed"]) == ("done", 40, 40, 0)
    assert (run["received"], run["distinct"], run["lost"], run["duplicated"]) == (40, 40, 0, 0)
