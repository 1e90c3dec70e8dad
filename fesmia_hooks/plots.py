"""Draw a run's leakage over training from its history alone: ``leakage.png``.

:func:`leakage_figure` and :func:`plot_leakage` (needs ``pip install 'fesmia-hooks[plot]'``)
draw one :class:`~fesmia_hooks.history.RunHistory`: both Log-MIA curves with their 95 %
interval bands and their chance levels dashed, the budget's ceilings on the Log-MIA
readings, and below them the share beyond chance that the level reads, with the level
bands, the budget line and the breaches marked.

What interprets the readings comes from the run's header (history format 2): the level bands
and the budget's ``max_level`` place the budget line, and the budget's ``max_values`` on
``log_mia_strict`` / ``log_mia_relaxed`` add a line each. A file written before format 2
records none of them; its picture uses ``LevelBands()`` and the default budget's ``"low"``,
unless told otherwise.

matplotlib is imported only when a picture is drawn, and pyplot never (the Agg canvas writes
the file), so drawing leaves the caller's matplotlib state alone.

Example:
    >>> import os, tempfile
    >>> from fesmia_hooks.history import load_runs
    >>> from fesmia_hooks.report import _example_report
    >>> from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink
    >>> folder = tempfile.mkdtemp()
    >>> JsonlSink(os.path.join(folder, HISTORY_FILE)).log(_example_report(), step=0)
    >>> [run] = load_runs(folder)
    >>> written = plot_leakage(run)
    >>> written.name, written.read_bytes()[1:4]
    ('leakage.png', b'PNG')
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fesmia_hooks.report import Level, LevelBands

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from fesmia_hooks.history import RunHistory

__all__ = ["FROM_HISTORY", "PLOT_FILE", "leakage_figure", "plot_leakage"]

#: Name of the picture written next to a run's history.
PLOT_FILE = "leakage.png"


class _FromHistory(Enum):
    FROM_HISTORY = "from the history"

    def __repr__(self) -> str:
        return "FROM_HISTORY"


#: Default of ``max_level``: take the budget's ``max_level`` from the run's header.
FROM_HISTORY: Final = _FromHistory.FROM_HISTORY

_COLORS = {"strict": "tab:blue", "relaxed": "tab:orange"}


def _budget_threshold(bands: LevelBands, max_level: Level | str | None) -> float | None:
    """Share beyond chance at which the first level above ``max_level`` starts (or ``None``).

    Example:
        >>> _budget_threshold(LevelBands(), "low"), _budget_threshold(LevelBands(), "high")
        (0.1, 0.6)
        >>> _budget_threshold(LevelBands(), "critical") is None
        True
    """
    if max_level is None:
        return None
    level = Level(max_level)
    starts = {Level.LOW: bands.moderate, Level.MODERATE: bands.high, Level.HIGH: bands.critical}
    return starts.get(level)


def leakage_figure(
    run: RunHistory,
    *,
    bands: LevelBands | None = None,
    max_level: Level | str | None | _FromHistory = FROM_HISTORY,
    title: str | None = None,
) -> Figure:
    """The leakage picture of one run as a matplotlib ``Figure`` (not shown, not saved).

    The top panel draws the strict and relaxed Log-MIA means with their 95 % interval bands
    (over canary draws), their chance levels as dashed lines. The bottom panel draws the
    reading the level is based on, the share beyond chance (0 at chance), with the level
    bands, the budget line and the checks that breached it. Filled markers are checks
    significantly above chance at the run-level threshold; hollow ones are not. A history
    written before the share was recorded gets the top panel only, with its breaches.

    The budget line (artist gid ``"budget"``, on the bottom panel) is drawn where the level
    above ``max_level`` starts on ``bands``. Both come from the run's header unless given
    (:attr:`~fesmia_hooks.history.RunHistory.bands`,
    :attr:`~fesmia_hooks.history.RunHistory.max_level`): for a run recorded without a budget
    there is no line; for a file without headers the defaults, ``LevelBands()`` and
    ``"low"``, put it at a share of 0.1, where ``"moderate"`` starts. The budget's
    ``max_values`` on ``log_mia_strict`` and ``log_mia_relaxed``, when the header records
    them, add a dash-dotted line each (gids ``"ceiling_strict"``, ``"ceiling_relaxed"``),
    whatever ``max_level`` says.

    Args:
        run: The run, with at least one successful check.
        bands: The level bands the monitor used; the run's recorded ones when omitted.
        max_level: The budget's ``max_level``; :data:`FROM_HISTORY` (the default) takes the
            run's recorded one; ``None`` draws no budget line.
        title: Figure title; the run's folder when omitted.

    Returns:
        The figure at 100 dpi: two axes (10 x 7 inches), or one (10 x 4.5) for an older
        history.

    Raises:
        HistoryError: The run has no successful check.
        ImportError: matplotlib is not installed.
        ValueError: ``max_level`` is not a level.

    Example:
        >>> from pathlib import Path
        >>> from fesmia_hooks.history import RunHistory
        >>> from fesmia_hooks.report import _example_report
        >>> record = {**_example_report().as_dict(), "check": 1}
        >>> settings = {"calibration": {"bands": {"moderate": 0.3, "high": 0.6}},
        ...             "budget": {"max_level": "moderate", "max_values": {"log_mia_strict": 0.4}}}
        >>> fig = leakage_figure(RunHistory(Path("run/h.jsonl"), (record,), settings=settings))
        >>> lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines}
        >>> lines["budget"].get_ydata()[0], lines["ceiling_strict"].get_ydata()[0]
        (0.6, 0.4)
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the leakage plot needs matplotlib: pip install 'fesmia-hooks[plot]'"
        ) from exc
    from fesmia_hooks.history import HistoryError

    if not run.records:
        raise HistoryError(f"{run.path}: no successful check to plot")
    bands = bands if bands is not None else run.bands
    level = run.max_level if isinstance(max_level, _FromHistory) else max_level
    level = None if level is None else Level(level)
    x = run.x
    with_share = all(r.get("share_beyond_chance") is not None for r in run.records)
    fig = Figure(figsize=(10, 7 if with_share else 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(2 if with_share else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    significant = [bool(r.get("significant")) for r in run.records]

    def values(key: str) -> list[float]:
        return [math.nan if r.get(key) is None else float(r[key]) for r in run.records]

    def marked(target: Any, xs: list[float], ys: list[float], color: str, name: str) -> None:
        for sig, face in ((True, color), (False, "white")):
            pts = [(xi, yi) for xi, yi, s in zip(xs, ys, significant, strict=True) if s is sig]
            if pts:
                target.plot(*zip(*pts, strict=True), linestyle="none", marker="o",
                            markersize=4, color=color, markerfacecolor=face,
                            gid=f"points_{name}_{sig}", label="_nolegend_")

    for name, color in _COLORS.items():
        key = f"log_mia_{name}"
        mean, low, high = values(key), values(key + "_low"), values(key + "_high")
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0,
                        gid=f"band_{name}", label=f"_{name} 95% interval")
        ax.plot(x, mean, color=color, linewidth=1.8, gid=f"log_mia_{name}",
                label=f"Log-MIA {name} (95% interval over canary draws)")
        marked(ax, x, mean, color, name)
        chance = values(f"chance_{name}")
        ax.plot(x, chance, color=color, linestyle="--", linewidth=1.2, gid=f"chance_{name}",
                label=f"chance {name} ({chance[-1]:.2f})")
    ceilings = run.max_values
    for name, color in _COLORS.items():
        key = f"log_mia_{name}"
        if key in ceilings:
            ax.axhline(ceilings[key], color=color, linestyle="-.", linewidth=1.2,
                       gid=f"ceiling_{name}", label=f"budget: {key} > {ceilings[key]:g}")
    breached = [i for i, r in enumerate(run.records) if r.get("breached")]
    actions = sorted({str(run.records[i].get("action", "?")) for i in breached})
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Log-MIA (0 = nothing, 1 = every member named)")
    if with_share:
        share_ax = axes[1]
        share = values("share_beyond_chance")
        share_ax.plot(x, share, color="tab:green", linewidth=1.8, gid="share",
                      label=f"share beyond chance ({bands.on}): the level's reading")
        marked(share_ax, x, share, "tab:green", "share")
        share_ax.axhline(0, color="gray", linestyle="--", linewidth=1.0, gid="chance_share",
                         label="chance (0)")
        for lv, start in bands.starts().items():
            share_ax.axhline(start, color="gray", linestyle=":", linewidth=0.8,
                             gid=f"band_{lv.value}", label="_nolegend_")
            share_ax.text(x[0], start, f" {lv.value}", fontsize=7, color="gray", va="bottom")
        threshold = _budget_threshold(bands, level)
        if threshold is not None and level is not None:
            share_ax.axhline(threshold, color="tab:red", linestyle=":", linewidth=1.5,
                             gid="budget",
                             label=f"budget: share >= {threshold:g} (level above "
                                   f"{level.value!r})")
        if breached:
            share_ax.plot([x[i] for i in breached], [share[i] for i in breached],
                          linestyle="none", marker="X", markersize=9, color="tab:red",
                          markeredgecolor="black", gid="breaches",
                          label=f"budget breached ({', '.join(actions)})")
        low = min([0.0, *(v for v in share if math.isfinite(v))])
        share_ax.set_ylim(min(-0.05, low - 0.05), 1.05)
        share_ax.set_ylabel("share beyond chance\n(0 = chance, 1 = every member)")
        share_ax.grid(True, alpha=0.3)
    elif breached:
        on = values(f"log_mia_{bands.on}")
        ax.plot([x[i] for i in breached], [on[i] for i in breached], linestyle="none",
                marker="X", markersize=9, color="tab:red", markeredgecolor="black",
                gid="breaches", label=f"budget breached ({', '.join(actions)})")
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    handles.append(Line2D([], [], linestyle="none", marker="o", color="gray",
                          label="filled: significant (p <= run-level threshold)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    if len(x) == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)
    axes[-1].set_xlabel(
        {"epoch": "epoch", "step": "optimizer step", "check": "check"}[run.x_label]
    )
    ax.grid(True, alpha=0.3)
    first = run.records[0]
    detail = ", ".join(f"{first[k]} {k}" for k in ("shots", "queries", "episodes") if k in first)
    heading = title if title is not None else str(run.folder)
    if run.runs > 1:
        heading += f" (run {run.run} of {run.runs})"
    ax.set_title(f"Privacy leakage (FeS-MIA, {first.get('method', '?')}"
                 + (f", {detail}" if detail else "") + f")\n{heading}", fontsize=10)
    return fig


def plot_leakage(
    run: RunHistory,
    path: str | os.PathLike[str] | None = None,
    *,
    bands: LevelBands | None = None,
    max_level: Level | str | None | _FromHistory = FROM_HISTORY,
    title: str | None = None,
) -> Path:
    """Write the picture of :func:`leakage_figure` as a PNG (Agg backend, pyplot untouched).

    Args:
        run: The run, with at least one successful check.
        path: Where to write; ``leakage.png`` in the run's folder when omitted. A folder (an
            existing one, or a path without a file suffix) gets ``leakage.png`` inside it.
        bands: The level bands the monitor used; the run's recorded ones when omitted.
        max_level: The budget's ``max_level``; :data:`FROM_HISTORY` (the default) takes the
            run's recorded one; ``None`` draws no budget line.
        title: Figure title; the run's folder when omitted.

    Returns:
        The path written.

    Raises:
        HistoryError: The run has no successful check.
        ImportError: matplotlib is not installed (``pip install 'fesmia-hooks[plot]'``).
        ValueError: ``max_level`` is not a level.
    """
    fig = leakage_figure(run, bands=bands, max_level=max_level, title=title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = run.folder / PLOT_FILE if path is None else Path(path)
    if target.is_dir() or not target.suffix:
        target = target / PLOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(target))
    return target
