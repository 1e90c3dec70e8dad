"""Where reports go: one small contract, ``log(report, step)`` and ``close()``.

Three optional hooks complete it; a sink that has them is told about the run around the
checks: ``start_run(header)`` before the first check of a run (the header holds the run's
id and the settings that interpret it), ``log_failure(record)`` for a check that failed,
and ``resume(run_id, check, errors, header)`` when a run continues from a saved state at
check ``check`` (``errors``: its failed checks; ``header``: as for ``start_run``).
:func:`sinks_for` builds the sinks of a folder, so a monitor never needs to know which sinks
those are.

* :class:`TensorBoardSink` writes scalars under ``privacy/``, a custom-scalars layout that
  draws each Log-MIA with its interval and its chance level, histograms of member and
  non-member scores, a PR curve and a text summary. Its writer opens lazily, on first use.
* :class:`JsonlSink` appends one JSON line per check and flushes it to disk at once.
* :class:`NullSink` drops everything (used when there is no ``log_dir``).

Only aggregates are written: never a canary input or label.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fesmia_hooks.report import LeakageReport, scalar_keys

__all__ = [
    "HISTORY_FILE",
    "HISTORY_FORMAT",
    "JsonlSink",
    "PENDING_LINES",
    "NullSink",
    "PREFIX",
    "Sink",
    "TensorBoardSink",
    "scalar_metrics",
    "sinks_for",
]

#: Prefix of every metric key and TensorBoard tag.
PREFIX = "privacy/"
#: Name of the JSON-lines history inside a run's ``log_dir``.
HISTORY_FILE = "privacy_history.jsonl"
#: Format of the history's lines: a ``{"record": "run", ...}`` header opens each run and
#: every line carries the run's ``run_id``.
HISTORY_FORMAT = 2
#: Most lines a history sink keeps while the disk refuses them.
PENDING_LINES = 10_000

log = logging.getLogger(__name__)


#: Readings taken only when their source is given (an accountant, coin-drawn canaries): left
#: out of the scalars, rather than logged as NaN, when they were not read.
READ_WHEN_GIVEN: tuple[str, ...] = ("epsilon_lower_bound", "epsilon_accountant")


def scalar_metrics(report: LeakageReport) -> dict[str, float]:
    """The report's numeric fields as ``{"privacy/<key>": float}``, the shared vocabulary.

    The differential-privacy readings (:data:`READ_WHEN_GIVEN`) are left out when they were
    not read (NaN), so that loggers get no series of NaN for them.

    Example:
        >>> from fesmia_hooks.report import _example_report
        >>> m = scalar_metrics(_example_report())
        >>> m["privacy/log_mia_strict"], m["privacy/level_index"], m["privacy/significant"]
        (0.5, 2.0, 1.0)
    """
    values = report.as_dict()
    return {
        PREFIX + key: float(values[key])
        for key in scalar_keys()
        if isinstance(values.get(key), (int, float))
        and not (key in READ_WHEN_GIVEN and math.isnan(values[key]))
    }


@runtime_checkable
class Sink(Protocol):
    """Anything that receives reports."""

    def log(self, report: LeakageReport, step: int) -> None:
        """Record one report at global ``step``."""

    def close(self) -> None:
        """Flush and release resources."""


class NullSink:
    """A sink that records nothing."""

    def log(self, report: LeakageReport, step: int) -> None:
        """Drop the report."""

    def close(self) -> None:
        """Nothing to close."""


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class JsonlSink:
    """Append one JSON line per check to ``path``, flushed and synced to disk.

    Each run opens with a header line (``{"record": "run", "run_id": ..., "settings":
    ...}``, see :meth:`start_run`) and every line carries its run's ``run_id``, so runs that
    share a file are told apart and a resumed run rewrites only its own lines. A line the
    disk refuses (full, gone) is kept and written before the next one, and a resume that
    could not rewrite the file is done again before the next write: a failure loses at most
    what is still waiting when the process ends (at most :data:`PENDING_LINES` lines).

    Args:
        path: The history file; its folder is created on first write.

    Example:
        >>> import tempfile, json
        >>> from fesmia_hooks.report import _example_report
        >>> folder = tempfile.mkdtemp()
        >>> sink = JsonlSink(os.path.join(folder, "h.jsonl"))
        >>> sink.start_run({"run_id": "a1", "settings": {}})
        >>> sink.log(_example_report(), step=3)
        >>> sink.close()
        >>> [json.loads(line).get("log_mia_strict") for line in open(sink.path)]
        [None, 0.5]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.run_id: str | None = None
        self._lock: Any = None
        self._pending: list[str] = []
        self._pending_resume: tuple[Any, ...] | None = None

    def _claim(self) -> None:
        """Hold the history file until :meth:`close`; warn when another writer holds it.

        Runs sharing one file are kept apart by their run ids (a resume rewrites only its own
        run's lines), but two monitors writing one folder also mix their TensorBoard charts:
        the first write of a run takes an exclusive lock on ``<file>.lock`` (released on
        close, or when the process ends; across processes where the platform has
        ``fcntl``), and a second writer is warned.
        """
        if self._lock is None:
            self._lock = _lock_file(self.path.with_name(self.path.name + ".lock"))

    def start_run(self, header: dict[str, Any]) -> None:
        """Write the header line of a new run and tag the following lines with its id."""
        self._claim()
        self.run_id = header.get("run_id")
        self.write({"record": "run", "format": HISTORY_FORMAT, **header})

    def log(self, report: LeakageReport, step: int) -> None:
        """Append the report's :meth:`~LeakageReport.as_dict` with ``global_step``."""
        self.write({**report.as_dict(), "global_step": step})

    def log_failure(self, record: dict[str, Any]) -> None:
        """Append the record of a check that failed (it has an ``"error"`` key)."""
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line (tagged with the run id when there is one).

        Raises:
            OSError: When the line (and those still waiting) cannot be written now; they
                are kept and written before the next record.
        """
        if self.run_id is not None and "run_id" not in record:
            record = {**record, "run_id": self.run_id}
        line = json.dumps({k: _json_value(v) for k, v in record.items()}, sort_keys=False)
        self._pending.append(line)
        del self._pending[:-PENDING_LINES]
        self._write_pending()

    def _write_pending(self) -> None:
        """Append the lines still waiting, all or none of them.

        A write or sync the disk refuses (full, an I/O error) is cut back off the file, so
        that the next attempt neither duplicates a line nor glues a torn half-line to the
        next one.
        """
        if self._pending_resume is not None:
            self._rewrite(*self._pending_resume)
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview("".join(line + "\n" for line in self._pending).encode("utf-8"))
        # 0o666 less the umask: the mode Python's open() gives a new file
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except BaseException:  # a full disk, an I/O error, an interrupt half-way
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
        self._pending = []

    def resume(
        self,
        run_id: str,
        check: int,
        errors: list[dict[str, Any]] | None = None,
        header: dict[str, Any] | None = None,
    ) -> None:
        """Continue run ``run_id`` from a state saved after its check ``check``.

        Lines of that run written after the saved state (checks numbered above ``check``,
        failed checks the state does not know) are dropped, since they will be made again;
        lines of every other run are kept as they are. Lines that cannot be read (not JSON,
        or JSON that is not a record) are moved to ``<file>.unreadable`` with a warning,
        never deleted. The header is written when the file does not hold the run's yet (a
        run resumed into a new folder). The file is rewritten to a temporary file and
        renamed over the old one, so a crash leaves either the old file or the new one; a
        rewrite the disk refuses is done again before the next write.
        """
        self._claim()
        self.run_id = run_id
        # Lines still waiting (refused by the disk) follow the same rule as the file's; the
        # run's header, if one waits, is the rewrite's to put back.
        known = {_failure_key(e) for e in errors or ()}
        waiting = [(line, json.loads(line)) for line in self._pending]
        self._pending = [line for line, record in waiting
                         if _kept(record, run_id, check, known)
                         and not _is_header(record, run_id)]
        self._pending_resume = (run_id, check, list(errors or ()), header)
        self._rewrite(*self._pending_resume)

    def _rewrite(
        self, run_id: str, check: int, errors: list[dict[str, Any]], header: Any
    ) -> None:
        known = {_failure_key(e) for e in errors}
        kept: list[str] = []
        unreadable: list[str] = []
        has_header = False
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines() if (
            self.path.is_file()
        ) else []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable.append(line)
                continue
            if not isinstance(record, dict):
                unreadable.append(line)
                continue
            if _kept(record, run_id, check, known):
                kept.append(line)
                has_header |= _is_header(record, run_id)
        if not has_header and header is not None:
            kept.insert(0, json.dumps({"record": "run", "format": HISTORY_FORMAT, **header,
                                       "run_id": run_id}))
        if kept or self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in kept))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        self._pending_resume = None
        if unreadable:  # moved aside only once the file no longer holds them
            aside = self.path.with_name(self.path.name + ".unreadable")
            with open(aside, "a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in unreadable))
            log.warning("%s: %d unreadable line(s) moved to %s", self.path, len(unreadable),
                        aside)

    def close(self) -> None:
        """Write the lines still waiting, then release the claim on the file.

        A line the disk refused earlier is tried once more; nothing else stays open
        between writes.

        Raises:
            OSError: When the waiting lines still cannot be written (the claim is released).
        """
        try:
            self._write_pending()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            # The lock file stays: another writer may hold it open, and a new file would let
            # a third writer lock it unwarned.
            self._lock[0].close()
            self._lock = None


def _is_header(record: dict[str, Any], run_id: str) -> bool:
    """Whether ``record`` is the header line of run ``run_id``."""
    return record.get("run_id") == run_id and record.get("record") == "run"


def _kept(record: dict[str, Any], run_id: str, check: int, known: set[Any]) -> bool:
    """Whether a resume of run ``run_id`` from its check ``check`` keeps a history record.

    Every other run's record is kept, and this run's header; of its checks, those up to
    ``check``; of its failures, those the saved state knows (``known``) or up to ``check``.
    """
    if record.get("run_id") != run_id or record.get("record") == "run":
        return True
    if "error" in record and _failure_key(record) in known:
        return True
    return _int(record.get("check")) <= check


def _lock_file(path: Path) -> tuple[Any, bool]:
    """An open handle on ``path`` marking this writer's presence; a warning if others write.

    Every writer holds a shared lock while it is open. A new writer first tries the
    exclusive lock: it fails while any other writer is present, which is what warns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until released
    try:
        import fcntl
    except ImportError:  # pragma: no cover - platforms without fcntl: no lock
        return handle, False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except OSError:
        alone = False
        warnings.warn(
            f"fesmia-hooks: another monitor is writing {path.name[: -len('.lock')]} in "
            f"{path.parent}; runs stay apart in the history (by run id), but give each "
            "monitor its own log_dir to keep their TensorBoard charts apart",
            stacklevel=5,
        )
    try:  # present from now on, for the writers that come next
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # pragma: no cover - another writer is taking its exclusive lock
        pass
    return handle, alone


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _failure_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("check"), record.get("epoch"), record.get("step"))


def sinks_for(
    log_dir: str | os.PathLike[str] | None,
    *,
    tensorboard: bool = True,
    writer: Any = None,
    scalars: bool = True,
) -> list[Sink]:
    """The sinks of a run folder: the JSON-lines history and (optionally) TensorBoard.

    Args:
        log_dir: The folder; ``None`` gives no sinks.
        tensorboard: Write TensorBoard content too.
        writer: An existing ``SummaryWriter`` to write TensorBoard content through (for
            example a Lightning ``TensorBoardLogger``'s ``experiment``).
        scalars: Write scalars to TensorBoard (off when a framework logger writes them).

    Example:
        >>> [type(s).__name__ for s in sinks_for("runs/x")]
        ['JsonlSink', 'TensorBoardSink']
        >>> sinks_for(None)
        []
    """
    if log_dir is None:
        return []
    folder = Path(log_dir)
    out: list[Sink] = [JsonlSink(folder / HISTORY_FILE)]
    if tensorboard:
        out.append(TensorBoardSink(None if writer is not None else folder, writer=writer,
                                   scalars=scalars))
    return out


def custom_scalar_layout() -> dict[str, Any]:
    """TensorBoard custom-scalars layout: each Log-MIA with its interval and chance level."""
    p = PREFIX

    def margin(key: str) -> list[Any]:
        return ["Margin", [p + key, p + key + "_low", p + key + "_high"]]

    def lines(*keys: str) -> list[Any]:
        # Multiline tags are regular expressions: anchor them, or "log_mia_strict" would
        # also draw "log_mia_strict_low" and "log_mia_strict_high".
        return ["Multiline", [f"^{p}{key}$" for key in keys]]

    return {
        "Privacy leakage (FeS-MIA)": {
            "Log-MIA strict (95% interval over canary draws)": margin("log_mia_strict"),
            "Log-MIA relaxed (95% interval over canary draws)": margin("log_mia_relaxed"),
            "AUC (95% interval over canary draws)": margin("auc"),
            "Log-MIA against chance": lines(
                "log_mia_strict", "chance_strict", "log_mia_relaxed", "chance_relaxed"
            ),
            "Members named with no false accusation, against chance": lines(
                "members_named", "chance_members_named"
            ),
            "Share beyond chance (the level's reading; 0 = chance)": lines(
                "share_beyond_chance"
            ),
            "Significance (p-value and run-level threshold)": lines("p_value", "p_threshold"),
            "Level (0 none … 4 critical)": lines("level_index"),
            "DP ε: the accountant's upper bound and the canaries' lower bound": lines(
                "epsilon_accountant", "epsilon_lower_bound"
            ),
        }
    }


class TensorBoardSink:
    """Write reports as TensorBoard events through ``torch.utils.tensorboard``.

    Args:
        log_dir: Folder of the event files; ignored when ``writer`` is given.
        writer: An existing ``SummaryWriter`` to write through (for example a Lightning
            ``TensorBoardLogger``'s ``experiment``); it is then not closed by this sink.
        scalars: Write the scalars too; off when another logger already writes them.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        scalars: bool = True,
    ) -> None:
        if log_dir is None and writer is None:
            raise ValueError("TensorBoardSink needs `log_dir` or `writer`, got neither")
        self.log_dir = None if log_dir is None else str(log_dir)
        self._writer = writer
        self._owns_writer = writer is None
        self._layout_written = False
        self.scalars = scalars

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, opened on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def log(self, report: LeakageReport, step: int) -> None:
        """Write scalars, histograms, PR curve and summary text of one check."""
        w = self.writer
        if not self._layout_written:
            w.add_custom_scalars(custom_scalar_layout())
            self._layout_written = True
        for tag, value in scalar_metrics(report).items() if self.scalars else ():
            if math.isfinite(value):
                w.add_scalar(tag, value, step)
        members, non_members = report.member_scores, report.non_member_scores
        if len(members) and len(non_members):
            w.add_histogram(PREFIX + "scores/members", members, step)
            w.add_histogram(PREFIX + "scores/non_members", non_members, step)
            scores = np.concatenate([members, non_members])
            ranks = scores.argsort().argsort() / max(len(scores) - 1, 1)
            labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
            w.add_pr_curve(PREFIX + "pr_curve", labels, ranks, step)
        w.add_text(PREFIX + "summary", _markdown(report), step)
        w.flush()

    def close(self) -> None:
        """Close the writer if this sink opened it."""
        if self._writer is not None and self._owns_writer:
            self._writer.close()
            self._writer = None


def _markdown(report: LeakageReport) -> str:
    rows = [
        ("Log-MIA strict", f"{report.strict:.3f} [{report.strict_low:.3f}, "
         f"{report.strict_high:.3f}]", f"{report.chance_strict:.3f}"),
        ("Log-MIA relaxed", f"{report.relaxed:.3f} [{report.relaxed_low:.3f}, "
         f"{report.relaxed_high:.3f}]", f"{report.chance_relaxed:.3f}"),
        ("AUC", f"{report.auc:.3f} [{report.auc_low:.3f}, {report.auc_high:.3f}]", "0.500"),
        ("members named, no false accusation", f"{report.members_named:.2f} of "
         f"{report.queries}", f"{report.chance_members_named:.2f}"),
        ("share beyond chance (level)", f"{report.share_beyond_chance:.3f}", "0"),
    ]
    if math.isfinite(report.epsilon_lower_bound):
        rows.append((f"DP ε lower bound ({report.epsilon_confidence:.0%}, "
                     f"δ {report.epsilon_delta:g})", f"{report.epsilon_lower_bound:.3f}", "0"))
    if math.isfinite(report.epsilon_accountant):
        rows.append(("DP ε of the accountant (upper bound)",
                     f"{report.epsilon_accountant:.3f}", ""))
    table = (
        "| measure | value [95% interval over canary draws] | chance |\n|---|---|---|\n"
        + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    )
    return (
        f"**{report.summary()}**\n\n{table}\n\n"
        f"p-value {report.p_value:.4g} (run-level threshold {report.p_threshold:.4g}, "
        f"{report.permutations} permutations, statistic {report.statistic}"
        f"{'' if report.can_alarm else '; this check could not raise an alarm'}); "
        f"level **{report.level.value}**; "
        f"{report.method}, {report.shots} shots, {report.queries} queries, "
        f"{report.episodes} episodes."
    )
