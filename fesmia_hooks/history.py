"""Read a monitor's history back: its runs, their settings, and a table per run.

A :class:`~fesmia_hooks.PrivacyMonitor` with a ``log_dir`` appends one JSON line per check to
``privacy_history.jsonl`` (see :class:`~fesmia_hooks.sinks.JsonlSink`); a check that failed
leaves a line with an ``"error"`` key instead. Since format 2 each run first writes a header
line, ``{"record": "run", "format": 2, "run_id": ..., "started": ..., "settings": {...}}``,
with the settings that interpret its checks (the probe, the calibration and its level bands,
the budget, the canaries, the cadence), and tags each of its lines with its ``run_id``.

This module reads those files back, for one run or for every run found below a folder, into
:class:`RunHistory` objects, and prints a plain-text table per run (:func:`format_table`):
check, epoch, the strict and relaxed Log-MIA with their 95 % intervals, their chance levels,
the p-value against its run-level threshold, the level and the action taken. The picture,
``leakage.png``, is drawn by :mod:`fesmia_hooks.plots` (:func:`plot_leakage`, re-exported
here) from a :class:`RunHistory` alone.

Lines are grouped into runs by their ``run_id``, in the order the runs first appear, so the
lines of two runs that wrote to one file at the same time come apart again. Lines without a
``run_id`` (files written before format 2) are split into runs where the check counter starts
again. A missing or unreadable file raises :class:`HistoryError` with one line that names the
file, and the line, and what is wrong with it.

Example:
    >>> import os, tempfile
    >>> from fesmia_hooks.report import _example_report
    >>> from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink
    >>> folder = tempfile.mkdtemp()
    >>> sink = JsonlSink(os.path.join(folder, "run-a", HISTORY_FILE))
    >>> for epoch in range(2):
    ...     sink.log(_example_report().with_updates(check=epoch + 1, epoch=epoch), step=epoch)
    >>> [run] = load_runs(folder)
    >>> len(run.records), run.x_label, run.run_id, run.settings
    (2, 'epoch', None, {})
    >>> print(format_table(run, name="run-a"))  # doctest: +NORMALIZE_WHITESPACE
    run-a: 2 checks (simpleshot, 5 shots, 15 queries, 200 episodes, 999 permutations)
    check epoch strict [95% interval] relaxed [95% interval] chance s/r named (chance) share p / threshold level action
        1     0    0.50 [0.40, 0.60]    0.80 [0.70, 0.90]   0.18/0.59  3.1 (0.94)  0.15  0.001 / 0.004  moderate  -
        2     1    0.50 [0.40, 0.60]    0.80 [0.70, 0.90]   0.18/0.59  3.1 (0.94)  0.15  0.001 / 0.004  moderate  -
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fesmia_hooks.exceptions import ConfigurationError, FesmiaError
from fesmia_hooks.plots import PLOT_FILE, leakage_figure, plot_leakage
from fesmia_hooks.report import Level, LevelBands, required_keys, scalar_keys
from fesmia_hooks.sinks import HISTORY_FILE, HISTORY_FORMAT

__all__ = [
    "FORMAT",
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

#: The newest history format this module reads (the ``"format"`` of a run header).
FORMAT = HISTORY_FORMAT

# Both derive from the one vocabulary of metric keys (fesmia_hooks.report.METRICS).
_REQUIRED = tuple(required_keys())
_NUMBERS = tuple(k for k in scalar_keys() if k.startswith(("log_mia_", "chance_", "p_")))
_LEVELS = tuple(level.value for level in Level)
_BAND_KEYS = ("moderate", "high", "critical", "on")
#: ``max_level`` of a budget whose header does not name one (``LeakageBudget``'s default).
_DEFAULT_MAX_LEVEL = Level.LOW


class HistoryError(FesmiaError, ValueError):
    """A history file is missing, or it is not a history the monitor wrote."""


def _section(settings: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``settings[key]`` as a dict; ``{}`` when it is missing or ``None``."""
    value = settings.get(key)
    return value if isinstance(value, dict) else {}


def _bands(settings: Mapping[str, Any]) -> LevelBands:
    """The level bands of a header's settings; ``LevelBands()``'s values for those missing."""
    recorded = _section(_section(settings, "calibration"), "bands")
    return LevelBands(**{key: recorded[key] for key in _BAND_KEYS if key in recorded})


@dataclass(frozen=True)
class RunHistory:
    """The checks of one training run, as read from its history file.

    Attributes:
        path: The history file.
        records: The successful checks in order, as written by the monitor.
        errors: The failed checks (records with an ``"error"`` key).
        run: Which run of the file this is (1-based), when several runs appended to it.
        runs: How many runs the file holds.
        run_id: The run's id from its header and its tagged lines; ``None`` for a file
            written before format 2.
        settings: The ``"settings"`` of the run's header, as written (``{}`` without one):
            ``probe``, ``calibration`` (``alpha``, ``horizon``, ``bands``), ``budget``
            (``None`` for a run without one), ``canaries`` and ``cadence``. Read them through
            :attr:`bands`, :attr:`budget`, :attr:`max_level` and :attr:`max_values`.
    """

    path: Path
    records: tuple[dict[str, Any], ...] = field(repr=False)
    errors: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    run: int = 1
    runs: int = 1
    run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
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

    @property
    def bands(self) -> LevelBands:
        """The level bands the run classified its checks with (``LevelBands()`` if unrecorded).

        Raises:
            ConfigurationError: The recorded bands are not valid ones (never for a run that
                :func:`read_history` returned: it checks them).
        """
        return _bands(self.settings)

    @property
    def budget(self) -> dict[str, Any] | None:
        """The budget settings of the run's header; ``None`` without a budget or a header.

        A header with ``"budget": null`` is a run that only measured; a file without headers
        does not say (see :attr:`max_level` for what is assumed then).
        """
        budget = self.settings.get("budget")
        return budget if isinstance(budget, dict) else None

    @property
    def max_level(self) -> Level | None:
        """The budget's ``max_level``, for the budget line and the table heading.

        ``None`` when the header records a run without a budget, or a budget with no ceiling
        on the level. ``"low"`` (the default budget's) when the history does not say: a file
        written before format 2, or a header without a ``budget`` key, or a budget without a
        ``max_level`` key.
        """
        if "budget" not in self.settings:
            return _DEFAULT_MAX_LEVEL
        budget = self.budget
        if budget is None:
            return None
        level = budget.get("max_level", _DEFAULT_MAX_LEVEL)
        return None if level is None else Level(level)

    @property
    def max_values(self) -> dict[str, float]:
        """The budget's ceilings on readings (``{"log_mia_strict": 0.4}``), ``{}`` if none."""
        budget = self.budget or {}
        return {str(k): float(v) for k, v in (budget.get("max_values") or {}).items()}

    def rows(self) -> tuple[dict[str, Any], ...]:
        """Checks and failed checks together, in the order they were written."""
        return self._rows or tuple(sorted((*self.records, *self.errors),
                                          key=lambda r: r.get("check", 0)))


# ---------------------------------------------------------------------------- reading
def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _run_id(record: dict[str, Any], where: str) -> str | None:
    run_id = record.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise HistoryError(f"{where}: run_id must be a non-empty string, got {run_id!r}")
    return run_id


def _validate(record: Any, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path}: line {lineno}"
    if not isinstance(record, dict):
        raise HistoryError(f"{where} is not a JSON object, got {type(record).__name__}")
    if "record" in record:
        return _validate_header(record, where)
    _run_id(record, where)
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


def _validate_header(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Check what the reader interprets in a run header; other keys are left alone."""
    if record["record"] != "run":
        raise HistoryError(f"{where}: unknown record {record['record']!r} (a run header has "
                           "\"record\": \"run\"; a check has no \"record\" key)")
    _run_id(record, where)
    version = record.get("format")
    if isinstance(version, int) and version > FORMAT:
        log.warning("%s: a run header of format %d, newer than this version reads (%d); "
                    "reading the settings it knows", where, version, FORMAT)
    settings = record.get("settings")
    if settings is None:
        return record
    if not isinstance(settings, dict):
        raise HistoryError(f"{where}: the run header's settings must be a JSON object, "
                           f"got {type(settings).__name__}")
    for key in ("calibration", "budget"):
        if settings.get(key) is not None and not isinstance(settings[key], dict):
            raise HistoryError(f"{where}: settings.{key} must be a JSON object or null, "
                               f"got {type(settings[key]).__name__}")
    bands = _section(settings, "calibration").get("bands")
    if bands is not None and not isinstance(bands, dict):
        raise HistoryError(f"{where}: settings.calibration.bands must be a JSON object, "
                           f"got {type(bands).__name__}")
    try:
        _bands(settings)
    except ConfigurationError as exc:
        raise HistoryError(f"{where}: settings.calibration.bands are not valid: {exc}") from None
    budget = _section(settings, "budget")
    level = budget.get("max_level")
    if level is not None and level not in _LEVELS:
        raise HistoryError(f"{where}: settings.budget.max_level must be one of "
                           f"{', '.join(_LEVELS)} or null, got {level!r}")
    ceilings = budget.get("max_values")
    if ceilings is not None and not (
        isinstance(ceilings, dict)
        and all(_number(v) and v is not None for v in ceilings.values())
    ):
        raise HistoryError(f"{where}: settings.budget.max_values must map readings to "
                           f"numbers, got {ceilings!r}")
    return record


def read_history(path: str | os.PathLike[str]) -> list[RunHistory]:
    r"""Read one history file; one :class:`RunHistory` per run that wrote to it.

    A run header (``"record": "run"``) starts a run and gives it its ``settings``; a line
    with a ``run_id`` belongs to the run of that id, wherever it stands in the file, so the
    lines of runs that interleave are grouped back. Runs come in the order they first appear.
    Lines without a ``run_id`` are split into runs where the check counter starts again (a
    header without a ``run_id`` starts such a run). A header whose run made no check (killed
    before its first) gives no run. Blank lines are skipped, and so is an unfinished last
    line (a run killed while writing), with a logged warning.

    Args:
        path: A ``privacy_history.jsonl`` file.

    Returns:
        The runs of the file, with at least one check (successful or failed) each.

    Raises:
        HistoryError: The file is missing, unreadable, empty, or holds a line that is not a
            check or a run header the monitor wrote.

    Example:
        >>> import json, os, tempfile
        >>> from fesmia_hooks.report import _example_report
        >>> path = os.path.join(tempfile.mkdtemp(), "privacy_history.jsonl")
        >>> check = {**_example_report().as_dict(), "check": 1, "global_step": 0}
        >>> header = {"record": "run", "format": 2, "run_id": "a1",
        ...           "settings": {"budget": {"max_level": "moderate", "action": "stop"}}}
        >>> with open(path, "w") as f:
        ...     for line in (header, {**header, "run_id": "b2"}, {**check, "run_id": "a1"},
        ...                  {**check, "run_id": "b2"}, {**check, "check": 2, "run_id": "a1"}):
        ...         _ = f.write(json.dumps(line) + "\n")
        >>> [(r.run_id, len(r.records), r.max_level) for r in read_history(path)]
        [('a1', 2, <Level.MODERATE: 'moderate'>), ('b2', 1, <Level.MODERATE: 'moderate'>)]
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
    runs = _split_runs(path, records)
    if not runs:
        raise HistoryError(f"{path}: holds no checks (only the header of a run that made none)")
    return runs


@dataclass
class _Group:
    run_id: str | None
    settings: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def _split_runs(path: Path, records: list[dict[str, Any]]) -> list[RunHistory]:
    groups: list[_Group] = []
    by_id: dict[str, _Group] = {}
    untagged: _Group | None = None  # the run that lines without a run_id join
    last = 0  # its last successful check

    def tagged(run_id: str) -> _Group:
        if run_id not in by_id:
            by_id[run_id] = _Group(run_id)
            groups.append(by_id[run_id])
        return by_id[run_id]

    for record in records:
        run_id = record.get("run_id")
        if "record" in record:  # a run header
            settings = record.get("settings") or {}
            if run_id is None:
                untagged, last = _Group(None, settings), 0
                groups.append(untagged)
            else:
                group = tagged(run_id)
                if group.settings is None:  # a repeated header (a resumed run) keeps the first
                    group.settings = settings
            continue
        if run_id is not None:
            tagged(run_id).rows.append(record)
            continue
        # A failed check takes the number of the next check (the counter moves on successes
        # only), so a new run shows as a number at or below the last successful check.
        if untagged is None or record["check"] <= last:
            untagged, last = _Group(None), 0
            groups.append(untagged)
        untagged.rows.append(record)
        if "error" not in record:
            last = record["check"]
    groups = [group for group in groups if group.rows]
    return [
        RunHistory(
            path=path,
            records=tuple(r for r in group.rows if "error" not in r),
            errors=tuple(r for r in group.rows if "error" in r),
            run=index,
            runs=len(groups),
            run_id=group.run_id,
            settings=group.settings or {},
            _rows=tuple(group.rows),
        )
        for index, group in enumerate(groups, start=1)
    ]


def load_runs(path: str | os.PathLike[str]) -> list[RunHistory]:
    """Every run of a history file, or of every ``privacy_history.jsonl`` below a folder.

    Args:
        path: A history file, or a folder searched recursively.

    Returns:
        The runs of each file (see :func:`read_history`), files in sorted path order.

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


def _budget_text(run: RunHistory) -> str | None:
    """The budget as the run's header records it, for the table heading; ``None`` if unsaid."""
    if "budget" not in run.settings:
        return None
    budget = run.budget
    if budget is None:
        return "no budget"
    level = run.max_level
    parts = [f"max_level {level.value}" if level is not None else "no max_level"]
    parts += [f"{key} > {value:g}" for key, value in run.max_values.items()]
    for key in ("patience", "min_checks"):
        if budget.get(key) not in (None, 1):
            parts.append(f"{key} {budget[key]}")
    if budget.get("action") is not None:
        parts.append(f"action {budget['action']}")
    return "budget: " + ", ".join(parts)


def format_table(run: RunHistory, *, name: str | None = None) -> str:
    """A plain-text table of one run: one row per check (and per failed check).

    Columns: check, epoch (and step, for runs checked by optimizer steps), strict and relaxed
    Log-MIA with their 95 % intervals over canary draws, their chance levels (strict/relaxed),
    the members named with no false accusation against chance, the share beyond chance the level
    reads, the p-value against the run-level threshold, the level, and the action taken (``-``
    for none; ``-`` also for readings an older history lacks). A heading names the run, the
    probe and, when the run's header records it, the budget (``budget: max_level low, action
    stop``; ``no budget`` for a run without one; ``log_mia_strict > 0.4`` for each ceiling of
    ``max_values``); a last line says where the budget was breached, if it was.

    Args:
        run: The run.
        name: How to call the run in the heading; its folder when omitted.

    Returns:
        The table: the heading, the column names, a line per row, and the breach line if
        any; no newline at its end.
    """
    title = str(name if name is not None else run.folder)
    if run.runs > 1:
        title += f" (run {run.run} of {run.runs} in {run.path.name}"
        title += f", id {run.run_id})" if run.run_id is not None else ")"
    checks = len(run.records)
    heading = f"{title}: {checks} check{'s' if checks != 1 else ''}"
    if run.errors:
        heading += f", {len(run.errors)} failed"
    first = run.records[0] if run.records else _section(run.settings, "probe")
    probe = [str(first[k]) + label for k, label in (
        ("method", ""), ("shots", " shots"), ("queries", " queries"),
        ("episodes", " episodes"), ("permutations", " permutations")) if k in first]
    if probe:
        heading += f" ({', '.join(probe)})"
    budget = _budget_text(run)
    if budget is not None:
        heading += f"; {budget}"
    with_step = any(r.get("step") is not None for r in run.rows()) and run.x_label != "epoch"
    header = ["check", "epoch", *(["step"] if with_step else []), "strict [95% interval]",
              "relaxed [95% interval]", "chance s/r", "named (chance)", "share",
              "p / threshold", "level", "action"]
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
            f"{_f(r.get('members_named'), '.1f')} ({_f(r.get('chance_members_named'))})",
            _f(r.get("share_beyond_chance")),
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
