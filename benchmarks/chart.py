"""The PNG charts of the benchmarks, drawn in .tools/bench-report (matplotlib stays out of
the product's .venv):

    python -m benchmarks.chart REPORT PNG                # a benchmarks/warm.py report
    python -m benchmarks.chart --broadcast SERIES PNG    # broadcast_peers.chart_series's JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "ours": "this bot",
    "botbuilder": "Bot Framework SDK 4.17",
    "agents": "Agents SDK 1.9",
    "teams": "Teams SDK 2.1",
}


def main(report_path: str, png: str) -> None:
    report = json.loads(Path(report_path).read_text())
    warm = report["warm"]
    keys = [k for k in LABELS if k in warm]
    levels = [str(c) for c in report["concurrencies"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [n + i * width for n in range(len(levels))]
        by_c = warm[key]["concurrency"]
        metrics = ("activities_per_s", "p99_ms", "cpu_ms_per_activity")
        for axis, metric in zip(axes, metrics, strict=True):
            bars = axis.bar(xs, [by_c[c][metric] for c in levels], width, label=LABELS[key])
        # The storage emulator's CPU stacked on ours' own, hatched (only ours stores
        # anything; during the peers' runs Azurite idles, 0.0-0.01 ms per activity).
        storage = [by_c[c].get("storage_cpu_ms_per_activity") or 0.0 for c in levels]
        if key == "ours" and any(storage):
            axes[2].bar(
                xs,
                storage,
                width,
                bottom=[by_c[c]["cpu_ms_per_activity"] for c in levels],
                color=bars[0].get_facecolor(),
                alpha=0.45,
                hatch="//",
                label=f"{LABELS[key]}: storage (Azurite)",
            )
    titles = (
        "warm activities/s (higher is better)",
        "p99 latency, ms",
        "CPU ms per activity (hatched: Azurite's)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xticks([n + width * (len(keys) - 1) / 2 for n in range(len(levels))])
        axis.set_xticklabels([f"concurrency {c}" for c in levels])
    handles, labels = axes[2].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(handles))
    machine = report["machine"]
    figure.suptitle(
        f"{report['generated']}, {machine['cpus']} cores, load "
        f"{machine['load_average_1m']['start']}-{machine['load_average_1m']['end']}"
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(png, dpi=100)


def broadcast(series_path: str, png: str) -> None:
    series = json.loads(Path(series_path).read_text())
    limited, free = series["limited"], series["unthrottled"]
    panels = [
        (limited, "delivered_per_s", "delivered/s, Teams limits enforced"),
        (limited, "lost_percent", "conversations that never got it, %"),
        (limited, "cpu_ms_per_send", "CPU ms per delivered send (ours: host + Azurite)"),
        (free, "delivered_per_s", "delivered/s, no limits enforced"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(20, 6), layout="constrained")
    for axis, (rows, metric, title) in zip(axes, panels, strict=True):
        labels = [row["label"] for row in rows]
        values = [row[metric] or 0 for row in rows]
        colors = ["tab:blue" if label.startswith("ours") else "tab:gray" for label in labels]
        axis.barh(range(len(rows)), values, color=colors)
        if metric == "cpu_ms_per_send":  # ours' storage (Azurite) beside the host's own
            storage = [row.get("storage_cpu_ms_per_send") or 0 for row in rows]
            axis.barh(range(len(rows)), storage, left=values, color="tab:cyan", label="Azurite")
            axis.legend(loc="lower right")
            values = [v + s for v, s in zip(values, storage, strict=True)]
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels(labels if axis is axes[0] or rows is free else [""] * len(rows))
        axis.invert_yaxis()
        axis.set_title(title)
        axis.set_xlim(0, max(values, default=0) * 1.18 or 1)  # room for the values beside
        for n, value in enumerate(values):
            axis.annotate(
                f"{value:g}",
                (value, n),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    enforced = series["enforced_rate_per_s"]
    axes[0].axvline(enforced, color="tab:red", linestyle="--", label=f"enforced: {enforced}/s")
    axes[0].legend(loc="lower right")
    figure.suptitle(series["title"])
    figure.savefig(png, dpi=100)


if __name__ == "__main__":
    if sys.argv[1] == "--broadcast":
        broadcast(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
