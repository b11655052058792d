"""The cold-start benchmark measures ours as a local process, wherever it runs."""

from __future__ import annotations

from benchmarks.cold_start import child_env, local_mode_env
from shared.config import AZURE_HOST_MARKERS, Settings


def test_a_container_that_says_azure_still_measures_ours_in_local_mode(monkeypatch):
    # Some containers carry a variable the Functions host reads as "Azure" (this kind of
    # machine sets CONTAINER_NAME); the bot refuses unauthenticated mode where one is set.
    for name in AZURE_HOST_MARKERS:
        monkeypatch.setenv(name, "from-the-container")
    monkeypatch.setenv("BOT_SCHEDULE", "left over from a shell")

    env = child_env(local_mode_env("ours", "http://127.0.0.1:1/"))

    assert not set(env) & set(AZURE_HOST_MARKERS)
    assert "BOT_SCHEDULE" not in env
    assert Settings.from_env(env).auth_disabled  # accepted: local mode
