"""The PNG plots of BENCHMARKS.md, drawn with matplotlib from ``benchmarks/results.json``.

Each ``plot_*`` returns whether it wrote its file (False without matplotlib or data).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _plot(path: Path, draw: Callable[[Any], None], size: tuple[float, float]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dev dependency
        return False
    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_cost(cost: dict[str, Any], path: Path) -> bool:
    defaults = cost["defaults"]
    floor = cost["workloads"]["cnn"]["floor_s"]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for param, sweep in cost["sweeps"].items():
            rows = sweep["rows"]
            if not rows:
                continue
            x = [r["value"] / defaults[param] for r in rows]
            ax.plot(x, [1e3 * r["check_s"] for r in rows], marker="o",
                    label=f"{param} (slope {sweep['loglog_slope']:.2f})")
        ax.axhline(1e3 * floor, color="k", ls="--", lw=1, label="floor: forward pass")
        ax.axhline(1.25e3 * floor, color="r", ls=":", lw=1, label="target: 1.25 × floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("setting / its default")
        ax.set_ylabel("one check (ms)")
        ax.set_title("Cost of one check on the CNN, one setting varied at a time")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)

    return _plot(path, draw, (7, 4.5))


def plot_fidelity(runs: list[dict[str, Any]], path: Path) -> bool:
    shown = [r for r in runs if not r["spec"]["crafted"]]
    if not shown:
        return False
    cols = min(3, len(shown))
    rows_n = math.ceil(len(shown) / cols)

    def draw(fig: Any) -> None:
        for i, run in enumerate(shown):
            ax = fig.add_subplot(rows_n, cols, i + 1)
            epochs = [c["epoch"] + 1 for c in run["checks"]]
            ax.plot(epochs, [c["probe"]["relaxed"] for c in run["checks"]], lw=1,
                    label="probe: relaxed Log-MIA")
            share = "share" in run["checks"][0]["probe"]
            key = "share" if share else "strict"
            what = "share beyond chance" if share else "strict Log-MIA"
            ax.plot(epochs, [c["probe"][key] for c in run["checks"]], lw=1,
                    label=f"probe: {what}")
            ax.plot(epochs, [c["population"]["auc"] for c in run["checks"]], lw=1.5, color="k",
                    label="population attack: AUC")
            ax.plot(epochs, [c["population"].get(key) for c in run["checks"]], lw=1,
                    color="grey", ls="--", label=f"population attack: {what}")
            if share:
                ax.axhline(0.1, color="orange", ls=":", lw=1, label="moderate band (0.1)")
            summ = run["summary"]
            if summ["probe_first_alarm_epoch"] is not None:
                ax.axvline(summ["probe_first_alarm_epoch"] + 1, color="r", lw=1,
                           label="probe's first alarm")
            if summ["population_first_crossing_epoch"] is not None:
                ax.axvline(summ["population_first_crossing_epoch"] + 1, color="g", ls=":",
                           lw=1, label="population crosses the budget")
            ax.set_title(run["spec"]["name"], fontsize=9)
            ax.set_ylim(-0.05, 1.02)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.legend(fontsize=6)

    return _plot(path, draw, (4 * cols, 3 * rows_n))

