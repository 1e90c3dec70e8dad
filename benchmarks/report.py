"""Write BENCHMARKS.md (tables, and PNG plots) from ``benchmarks/results.json``.

The work is split three ways: ``benchmarks/analysis.py`` computes (statistics, targets, the
decisions behind the recommendations), ``benchmarks/markdown.py`` writes the text, and
``benchmarks/figures.py`` draws the plots. This module keeps the entry points in one place
for ``benchmarks/run.py`` and the smoke test. Nothing here measures anything.
"""

from __future__ import annotations

from benchmarks.analysis import TARGETS, binomial_tail, bound, mean, section, slope
from benchmarks.figures import plot_cost, plot_fidelity
from benchmarks.markdown import (
    HEADINGS,
    interval,
    met,
    mode_note,
    ms,
    num,
    pct,
    recommendations,
    table,
    times,
    when,
    write_markdown,
)

__all__ = [
    "HEADINGS",
    "TARGETS",
    "binomial_tail",
    "bound",
    "interval",
    "mean",
    "met",
    "mode_note",
    "ms",
    "num",
    "pct",
    "plot_cost",
    "plot_fidelity",
    "recommendations",
    "section",
    "slope",
    "table",
    "times",
    "when",
    "write_markdown",
]
