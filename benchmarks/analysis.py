"""The computations behind BENCHMARKS.md: statistics, targets, and the decisions they drive.

Everything here reads numbers from ``benchmarks/results.json`` and returns numbers, lists or
names; nothing formats text (``benchmarks/markdown.py``) or draws (``benchmarks/figures.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: The targets each summary row is judged against.
TARGETS = {
    "cost": 1.25,
    "cost_digits": 10.0,
    "cost_text": 1.05,
    "overhead": 1.02,
    "tfp": 20.0,
    "rho": 0.9,
    "lira_tpr": 0.10,
    "placebo": 0.05,
    "agreement": 0.9,
}


# --------------------------------------------------------------------------- statistics
def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def bound(checks: int, alpha: float = 0.05) -> float:
    """False-alarm bound of the run-level test after ``checks`` checks, no horizon given."""
    return alpha * checks / (checks + 10)


def mean(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(ys) on log(xs), over the points where both are positive."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


# --------------------------------------------------------------------------- reading results
def section(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    sec = results.get("sections", {}).get(name)
    return None if sec is None else sec["result"]


def count_checks(run: dict[str, Any], full_set: bool, probe: bool) -> int:
    """Checks of ``run`` where the full-set attack flags ``full_set`` and the probe ``probe``."""
    return sum(c["population"]["crosses"] == full_set and c["probe"]["breached"] == probe
               for c in run["checks"])


def lira_hits(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs where LiRA reaches the target TPR at 1 % FPR."""
    return [r for r in runs if r.get("lira") and
            r["lira"]["tpr_at_1pct_fpr"] >= TARGETS["lira_tpr"]]


def full_set_break_even(overhead_row: dict[str, Any]) -> tuple[float, float]:
    """Seconds per sample of the full-set check, and the samples where it costs 20× the probe."""
    c = overhead_row
    per_sample = c["tfp_check_s"] / (c["train_samples"] + c["test_samples"])
    return per_sample, 20 * c["probe_check_s"] / per_sample


def cells_over_bound(
    configs: dict[str, Any], checks: int,
) -> list[tuple[str, str, dict[str, Any], float]]:
    """Placebo cells whose rate exceeds the bound, with P(at least that many alarms | bound)."""
    over = []
    for name, r in configs.items():
        for kind in ("natural", "crafted"):
            cell = r.get(kind)
            if cell and cell["rate"] > bound(checks):
                over.append((name, kind, cell,
                             binomial_tail(cell["alarms"], cell["runs"], bound(checks))))
    return over


# --------------------------------------------------------------------------- recommendations
def score_learners(
    runs: list[dict[str, Any]], pl: dict[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """Per learner/features configuration: ρ, cost, power on leaky runs, placebo rate."""
    scored = {}
    for name in runs[0]["alt"]:
        per = [r["alt"].get(name) for r in runs if r["summary"]["leaky"]]
        per = [p for p in per if p is not None and not p.get("cost_only")]
        if not per:
            continue
        rate = None
        if pl and pl["configs"].get(name, {}).get("natural"):
            rate = pl["configs"][name]["natural"]["rate"]
        every = [r["alt"].get(name) for r in runs]
        scored[name] = {
            "rho_all": mean([p["rho_relaxed"] for p in every if p and not p.get("cost_only")]),
            "rho": mean([p["rho_relaxed"] for p in per]),
            "seconds": mean([p["seconds_per_check"] for p in per]),
            "alarmed": sum(p["alarmed"] for p in per),
            "n": len(per),
            "placebo": rate,
        }
    return scored


def choose_learner(
    scored: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], str, list[str], str] | None:
    """Among honest configurations (≤ 5 % placebo alarms): the best ρ, those within 0.05 of it,
    and the cheapest of those; ``None`` when none is honest."""
    honest = {k: v for k, v in scored.items()
              if (v["placebo"] is None or v["placebo"] <= 0.05) and v["rho"] is not None}
    if not honest:
        return None
    best = max(honest, key=lambda k: honest[k]["rho"])  # type: ignore[arg-type,return-value]
    near = [k for k, v in honest.items() if v["rho"] >= honest[best]["rho"] - 0.05]
    cheap = min(near, key=lambda k: honest[k]["seconds"])
    return honest, best, near, cheap


def costlier_alternatives(
    honest: dict[str, dict[str, Any]], near: list[str], default: str,
) -> list[tuple[str, float]]:
    """Near-best configurations costing over twice the default, with their cost ratio."""
    d = honest[default]
    return [(k, honest[k]["seconds"] / d["seconds"]) for k in near
            if k != default and honest[k]["seconds"] > 2 * d["seconds"]]


def cheaper_but_worse(
    honest: dict[str, dict[str, Any]], near: list[str], default: str,
) -> list[str]:
    """Near-best configurations cheaper than the default whose ρ over all runs is 0.1 lower."""
    d = honest[default]
    return [k for k in near
            if honest[k]["seconds"] < d["seconds"] and (honest[k]["rho_all"] or 0) < (
                d["rho_all"] or 0) - 0.1]


def alarm_moves(runs: list[dict[str, Any]]) -> tuple[list[tuple[str, Any, Any]], int, int]:
    """First alarms, default → cheaper probe, per run that alarms with either; how many runs
    the cheaper probe alarms later on (or never); how many runs the default alarms on."""
    moves, later, alarmed = [], 0, 0
    for r in runs:
        d = r["summary"]["probe_first_alarm_epoch"]
        c = r["candidate_summary"]["probe_first_alarm_epoch"]
        if d is None and c is None:
            continue
        moves.append((r["spec"]["name"], d, c))
        alarmed += d is not None
        if d is not None and (c is None or c > d):
            later += 1
    return moves, later, alarmed


def cadence(overhead_row: dict[str, Any]) -> tuple[float, int]:
    """A check's share of an epoch, and the ``every_n_epochs`` that keeps it within 2 %."""
    share = overhead_row["probe_check_s"] / overhead_row["seconds_per_epoch"]
    return share, max(1, math.ceil(share / 0.02))


def rank_statistics(scenarios: dict[str, Any], alpha: float = 0.05) -> list[str]:
    """Item 8's rule as a ranking of the candidate alarm statistics, best first.

    Candidates whose size is compatible with ``alpha`` (the lower end of the exact interval
    of their rejection rate in the ``"null"`` scenario at most ``alpha``), ordered by their
    worst power over the leaky scenarios, then by their mean power.
    """
    null = scenarios["null"]["rejection"]
    leaky = [s for s in scenarios if s != "null"]
    power = {c: [scenarios[s]["rejection"][c]["rate"] for s in leaky] for c in null}
    return sorted((c for c in null if null[c]["low"] <= alpha),
                  key=lambda c: (min(power[c]), sum(power[c])), reverse=True)


def strict_flat_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leaky runs where the relaxed reading tracks (ρ ≥ 0.5) and the strict one does not."""
    return [r for r in runs if r["summary"]["leaky"] and r["summary"]["rho_strict"] is not None
            and r["summary"]["rho_strict"] < 0.5 <= (r["summary"]["rho_relaxed"] or 0)]


def lira_misses(runs: list[dict[str, Any]]) -> list[str]:
    """Names of the runs where LiRA reaches the target and the probe never alarms."""
    return [r["spec"]["name"] for r in lira_hits(runs) if not r["summary"]["alarmed"]]


def first_significant(run: dict[str, Any]) -> int | None:
    """First epoch whose check is significant at the run-level threshold (any level)."""
    for c in run["checks"]:
        if c["probe"].get("significant"):
            return int(c["epoch"])
    return None


def max_share(run: dict[str, Any]) -> float | None:
    """Largest share beyond chance the probe read over the run (None in older results)."""
    vals = [c["probe"]["share"] for c in run["checks"] if c["probe"].get("share") is not None]
    return max(vals) if vals else None
