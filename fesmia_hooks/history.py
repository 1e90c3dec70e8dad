"""Read a monitor's history back: a table per run and a picture of the leakage over training.

A :class:`~fesmia_hooks.PrivacyMonitor` with a ``log_dir`` appends one JSON line per check to
``privacy_history.jsonl`` (see :class:`~fesmia_hooks.sinks.JsonlSink`); a check that failed
leaves a line with an ``"error"`` key instead. This module reads those files back, for one
run or for every run found below a folder, and turns them into

* a plain-text table per run (:func:`format_table`): check, epoch, the strict and relaxed
  Log-MIA with their 95 % intervals, their chance levels, the p-value against its run-level
  threshold, the level and the action taken;
* ``leakage.png`` (:func:`plot_leakage`, needs ``pip install 'fesmia-hooks[plot]'``): both
  Log-MIA curves with their interval bands, their chance levels dashed, the budget line and
  the breaches marked.

A file that several runs appended to (the same ``log_dir`` reused, or ``monitor.reset()``)
is split into runs where the check counter starts again. A missing or unreadable file raises
:class:`HistoryError` with one line that names the file and what is wrong with it.

Example:
    >>> import os, tempfile
    >>> from fesmia_hooks.report import _example_report
    >>> from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink
    >>> folder = tempfile.mkdtemp()
    >>> sink = JsonlSink(os.path.join(folder, "run-a", HISTORY_FILE))
    >>> for epoch in range(2):
    ...     sink.log(_example_report().with_updates(check=epoch + 1, epoch=epoch), step=epoch)
    >>> [run] = load_runs(folder)
    >>> len(run.records), run.x_label
    (2, 'epoch')
    >>> print(format_table(run, name="run-a"))  # doctest: +NORMALIZE_WHITESPACE
    run-a: 2 checks (simpleshot, 5 shots, 15 queries, 200 episodes, 999 permutations)
    check epoch strict [95% interval] relaxed [95% interval] chance s/r  p / threshold level action
        1     0    0.50 [0.45, 0.55]    0.80 [0.75, 0.85]   0.18/0.59  0.001 / 0.004  high  -
        2     1    0.50 [0.45, 0.55]    0.80 [0.75, 0.85]   0.18/0.59  0.001 / 0.004  high  -
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fesmia_hooks.exceptions import FesmiaError
from fesmia_hooks.report import Level, LevelBands
from fesmia_hooks.sinks import HISTORY_FILE

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_FILE",
    "HistoryError",
    "RunHistory",
    "format_table",
    "leakage_figure",
    "load_runs",
    "plot_leakage",
    "read_history",
]

log = logging.getLogger(__name__)

#: Name of the picture written next to a run's history.
PLOT_FILE = "leakage.png"

_REQUIRED = ("check", "log_mia_strict", "log_mia_relaxed", "chance_strict", "chance_relaxed",
             "p_value", "p_threshold", "level")
_NUMBERS = ("log_mia_strict", "log_mia_strict_low", "log_mia_strict_high", "log_mia_relaxed",
            "log_mia_relaxed_low", "log_mia_relaxed_high", "chance_strict", "chance_relaxed",
            "p_value", "p_threshold")
_LEVELS = tuple(level.value for level in Level)


class HistoryError(FesmiaError, ValueError):
    """A history file is missing, or it is not a history the monitor wrote."""


@dataclass(frozen=True)
class RunHistory:
    """The checks of one training run, as read from its history file.

    Attributes:
        path: The history file.
        records: The successful checks in order, as written by the monitor.
        errors: The failed checks (records with an ``"error"`` key).
        run: Which run of the file this is (1-based), when several runs appended to it.
        runs: How many runs the file holds.
    """

    path: Path
    records: tuple[dict[str, Any], ...] = field(repr=False)
    errors: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    run: int = 1
    runs: int = 1
    _rows: tuple[dict[str, Any], ...] = field(default=(), repr=False, compare=False)

    @property
    def folder(self) -> Path:
        """The run's folder (where ``leakage.png`` goes)."""
        return self.path.parent

    @property
    def x_label(self) -> str:
        """What the checks are placed by: ``"epoch"``, ``"step"`` or ``"check"``."""
        for key in ("epoch", "step"):
            if self.records and all(r.get(key) is not None for r in self.records):
                return key
        return "check"

    @property
    def x(self) -> list[float]:
        """Where each check sits on the :attr:`x_label` axis."""
        return [float(r[self.x_label]) for r in self.records]

    @property
    def breaches(self) -> list[dict[str, Any]]:
        """The checks that breached the budget."""
        return [r for r in self.records if r.get("breached")]

    def rows(self) -> tuple[dict[str, Any], ...]:
        """Checks and failed checks together, in the order they were written."""
        return self._rows or tuple(sorted((*self.records, *self.errors),
                                          key=lambda r: r.get("check", 0)))


# ---------------------------------------------------------------------------- reading
def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _validate(record: Any, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path}: line {lineno}"
    if not isinstance(record, dict):
        raise HistoryError(f"{where} is not a JSON object, got {type(record).__name__}")
    check = record.get("check")
    if isinstance(check, bool) or not isinstance(check, int):
        raise HistoryError(f"{where} has no integer 'check' field, got {check!r}")
    if "error" in record:
        return record
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise HistoryError(f"{where} is not a privacy check: missing {', '.join(missing)}")
    bad = [key for key in _NUMBERS if not _number(record.get(key))]
    if bad:
        raise HistoryError(f"{where}: {bad[0]} must be a number, got {record[bad[0]]!r}")
    if record["level"] not in _LEVELS:
        raise HistoryError(f"{where}: level must be one of {', '.join(_LEVELS)}, "
                           f"got {record['level']!r}")
    return record


def read_history(path: str | os.PathLike[str]) -> list[RunHistory]:
    """Read one history file; one :class:`RunHistory` per run that appended to it.

    Blank lines are skipped, and so is an unfinished last line (a run killed while writing),
    with a logged warning.

    Args:
        path: A ``privacy_history.jsonl`` file.

    Raises:
        HistoryError: The file is missing, unreadable, empty, or holds a line that is not a
            check the monitor wrote.
    """
    path = Path(path)
    if not path.exists():
        raise HistoryError(f"{path}: no such file")
    if not path.is_file():
        raise HistoryError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HistoryError(f"{path}: not a JSON-lines history (not UTF-8 text)") from None
    except OSError as exc:
        raise HistoryError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):  # no newline after it: the write was cut short
                log.warning("%s: skipped the unfinished last line %d", path, lineno)
                continue
            raise HistoryError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg})"
            ) from None
        records.append(_validate(record, path, lineno))
    if not records:
        raise HistoryError(f"{path}: holds no checks (the file is empty)")
    return _split_runs(path, records)


def _split_runs(path: Path, records: list[dict[str, Any]]) -> list[RunHistory]:
    # A failed check takes the number of the next check (the counter moves on successes only),
    # so a new run shows as a number at or below the last successful check of the current run.
    groups: list[list[dict[str, Any]]] = [[]]
    last = 0
    for record in records:
        if record["check"] <= last:
            groups.append([])
            last = 0
        groups[-1].append(record)
        if "error" not in record:
            last = record["check"]
    return [
        RunHistory(
            path=path,
            records=tuple(r for r in group if "error" not in r),
            errors=tuple(r for r in group if "error" in r),
            run=index,
            runs=len(groups),
            _rows=tuple(group),
        )
        for index, group in enumerate(groups, start=1)
    ]


def load_runs(path: str | os.PathLike[str]) -> list[RunHistory]:
    """Every run of a history file, or of every ``privacy_history.jsonl`` below a folder.

    Args:
        path: A history file, or a folder searched recursively.

    Raises:
        HistoryError: ``path`` is missing, a folder without any history, or one of the files
            cannot be read (see :func:`read_history`).
    """
    root = Path(path)
    if not root.exists():
        raise HistoryError(f"{root}: no such file or folder")
    if root.is_file():
        return read_history(root)
    files = sorted(root.rglob(HISTORY_FILE))
    if not files:
        raise HistoryError(f"{root}: no {HISTORY_FILE} found in this folder or below it")
    return [run for file in files for run in read_history(file)]


# ---------------------------------------------------------------------------- table
def _f(value: Any, fmt: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _p(value: Any) -> str:
    if isinstance(value, (int, float)) and 0 < value < 0.001:
        return format(value, ".1e")
    return _f(value, ".3f")


def _interval(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    low, high = record.get(key + "_low"), record.get(key + "_high")
    if low is None or high is None:
        return _f(value)
    return f"{_f(value)} [{_f(low)}, {_f(high)}]"


def format_table(run: RunHistory, *, name: str | None = None) -> str:
    """A plain-text table of one run: one row per check (and per failed check).

    Columns: check, epoch (and step, for runs checked by optimizer steps), strict and
    relaxed Log-MIA with their 95 % intervals, their chance levels (strict/relaxed), the
    p-value against the run-level threshold, the level, and the action taken (``-`` for
    none). A heading names the run and the probe; a last line says where the budget was
    breached, if it was.

    Args:
        run: The run.
        name: How to call the run in the heading; its folder when omitted.
    """
    title = str(name if name is not None else run.folder)
    if run.runs > 1:
        title += f" (run {run.run} of {run.runs} in {run.path.name})"
    checks = len(run.records)
    heading = f"{title}: {checks} check{'s' if checks != 1 else ''}"
    if run.errors:
        heading += f", {len(run.errors)} failed"
    if run.records:
        first = run.records[0]
        probe = [str(first[k]) + label for k, label in (
            ("method", ""), ("shots", " shots"), ("queries", " queries"),
            ("episodes", " episodes"), ("permutations", " permutations")) if k in first]
        if probe:
            heading += f" ({', '.join(probe)})"
    with_step = any(r.get("step") is not None for r in run.rows()) and run.x_label != "epoch"
    header = ["check", "epoch", *(["step"] if with_step else []), "strict [95% interval]",
              "relaxed [95% interval]", "chance s/r", "p / threshold", "level", "action"]
    table: list[list[str]] = []
    for r in run.rows():
        where = [str(r["check"]), _f(r.get("epoch"), "d"),
                 *([_f(r.get("step"), "d")] if with_step else [])]
        if "error" in r:
            table.append([*where, f"check failed: {r['error']}"])
            continue
        action = r.get("action") or "none"
        table.append([
            *where,
            _interval(r, "log_mia_strict"),
            _interval(r, "log_mia_relaxed"),
            f"{_f(r['chance_strict'])}/{_f(r['chance_relaxed'])}",
            f"{_p(r['p_value'])} / {_p(r['p_threshold'])}",
            str(r["level"]),
            "-" if action == "none" else action,
        ])
    widths = [len(h) for h in header]
    for row in table:
        if len(row) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = len(header) - 2  # right-align everything but level and action

    def line(cells: Sequence[str]) -> str:
        if len(cells) < len(header):  # a failed check: its message spans the rest
            where = [c.rjust(w) for c, w in zip(cells[:-1], widths, strict=False)]
            return "  ".join([*where, cells[-1]])
        return "  ".join(c.rjust(w) if i < numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [heading, line(header), *(line(row) for row in table)]
    if run.breaches:
        breach = run.breaches[0]
        place = f"check {breach['check']}" + (
            f" (epoch {breach['epoch']})" if breach.get("epoch") is not None else
            f" (step {breach['step']})" if breach.get("step") is not None else "")
        more = len(run.breaches) - 1
        if more:
            place += f" and at {more} later check{'s' if more > 1 else ''}"
        lines.append(f"budget breached at {place}; action taken: {breach.get('action', '?')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- picture
def _budget_threshold(bands: LevelBands, max_level: Level | str | None) -> float | None:
    """Reading at which the first level above ``max_level`` starts (``None``: no line)."""
    if max_level is None:
        return None
    level = Level(max_level)
    starts = {Level.LOW: bands.moderate, Level.MODERATE: bands.high, Level.HIGH: bands.critical}
    return starts.get(level)


def leakage_figure(
    run: RunHistory,
    *,
    bands: LevelBands | None = None,
    max_level: Level | str | None = "low",
    title: str | None = None,
) -> Figure:
    """The leakage picture of one run as a matplotlib ``Figure`` (not shown, not saved).

    Draws the strict and relaxed Log-MIA means with their 95 % interval bands, their chance
    levels as dashed lines, the budget line and the checks that breached it. Filled markers
    are checks significantly above chance at the run-level threshold; hollow ones are not.

    The history does not record the budget, so the budget line is drawn where the level
    above ``max_level`` starts on ``bands`` (defaults: ``LevelBands()`` and the default
    budget's ``"low"``, so strict Log-MIA 0.25, where ``"moderate"`` starts).

    Args:
        run: The run, with at least one successful check.
        bands: The level bands the monitor used.
        max_level: The budget's ``max_level``; ``None`` draws no budget line.
        title: Figure title; the run's folder when omitted.

    Raises:
        HistoryError: The run has no successful check.
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the leakage plot needs matplotlib: pip install 'fesmia-hooks[plot]'"
        ) from exc
    if not run.records:
        raise HistoryError(f"{run.path}: no successful check to plot")
    bands = bands if bands is not None else LevelBands()
    if max_level is not None:
        max_level = Level(max_level)
    x = run.x
    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors = {"strict": "tab:blue", "relaxed": "tab:orange"}
    significant = [bool(r.get("significant")) for r in run.records]

    def values(key: str) -> list[float]:
        return [math.nan if r.get(key) is None else float(r[key]) for r in run.records]

    for name, color in colors.items():
        key = f"log_mia_{name}"
        mean, low, high = values(key), values(key + "_low"), values(key + "_high")
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0,
                        gid=f"band_{name}", label=f"_{name} 95% interval")
        ax.plot(x, mean, color=color, linewidth=1.8, label=f"Log-MIA {name} (95% interval)",
                gid=f"log_mia_{name}")
        for sig, face in ((True, color), (False, "white")):
            pts = [(xi, yi) for xi, yi, s in zip(x, mean, significant, strict=True) if s is sig]
            if pts:
                ax.plot(*zip(*pts, strict=True), linestyle="none", marker="o", markersize=4,
                        color=color, markerfacecolor=face, gid=f"points_{name}_{sig}",
                        label="_nolegend_")
        chance = values(f"chance_{name}")
        ax.plot(x, chance, color=color, linestyle="--", linewidth=1.2, gid=f"chance_{name}",
                label=f"chance {name} ({chance[-1]:.2f})")
    threshold = _budget_threshold(bands, max_level)
    if threshold is not None and max_level is not None:
        ax.axhline(threshold, color="tab:red", linestyle=":", linewidth=1.5, gid="budget",
                   label=f"budget: {bands.on} >= {threshold:g} (level above {max_level.value!r})")
    breached = [i for i, r in enumerate(run.records) if r.get("breached")]
    if breached:
        on = values(f"log_mia_{bands.on}")
        actions = sorted({str(run.records[i].get("action", "?")) for i in breached})
        ax.plot([x[i] for i in breached], [on[i] for i in breached], linestyle="none",
                marker="X", markersize=9, color="tab:red", markeredgecolor="black",
                gid="breaches", label=f"budget breached ({', '.join(actions)})")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="o", color="gray",
                          label="filled: significant (p <= run-level threshold)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    ax.set_ylim(0, 1.05)
    if len(x) == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)
    ax.set_xlabel({"epoch": "epoch", "step": "optimizer step", "check": "check"}[run.x_label])
    ax.set_ylabel("Log-MIA (0 = nothing, 1 = every member named)")
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
    max_level: Level | str | None = "low",
    title: str | None = None,
) -> Path:
    """Write the picture of :func:`leakage_figure` as a PNG (Agg backend, pyplot untouched).

    Args:
        run: The run, with at least one successful check.
        path: Where to write; ``leakage.png`` in the run's folder when omitted. A folder (an
            existing one, or a path without a file suffix) gets ``leakage.png`` inside it.
        bands: The level bands the monitor used.
        max_level: The budget's ``max_level``; ``None`` draws no budget line.
        title: Figure title; the run's folder when omitted.

    Returns:
        The path written.

    Raises:
        HistoryError: The run has no successful check.
        ImportError: matplotlib is not installed (``pip install 'fesmia-hooks[plot]'``).
    """
    fig = leakage_figure(run, bands=bands, max_level=max_level, title=title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    target = run.folder / PLOT_FILE if path is None else Path(path)
    if target.is_dir() or not target.suffix:
        target = target / PLOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(target))
    return target
