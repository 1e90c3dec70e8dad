"""Choosing the alarm statistic and checking the interval, on synthetic canary pools.

Every candidate statistic of ``fesmia_hooks.measurement.STATISTICS`` (and min-p
combinations of them) is computed on the same fixed label permutations, so each is a valid
permutation test; which one to use by default is a question of power. A pool of 64 members
+ 64 non-members is drawn from a known population with two correlated features (a
"confidence" signal and a noisy copy), in four scenarios:

* ``null``: members and non-members from one distribution (size, not power);
* ``mean shift``: members' confidence shifted by 0.5 sd;
* ``memorised outliers``: 10 % of members far out (+4 sd), the rest as non-members;
* ``low tail``: 30 % of non-members in a low tail (-3 sd), what an overfit model does to
  unseen hard samples; the top of the ranking is unchanged.

For each scenario and pool: one check (``FeSMIA`` defaults but the permutations), the
per-check p-value of every candidate, and whether each reading's intervals (over canary
draws, and over episodes) contain the population value -- the mean reading over many
episodes drawn from a very large pool of the same population.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

import fesmia_hooks as fh
from benchmarks.analysis import rank_statistics
from benchmarks.common import clopper_pearson
from fesmia_hooks.calibration import alarm_statistic
from fesmia_hooks.measurement import STATISTICS
from fesmia_hooks.sequential import permutation_p_values

log = logging.getLogger(__name__)

SCENARIOS = ("null", "mean shift", "memorised outliers", "low tail")
CANDIDATES = ("relaxed", "strict", "auc", "pooled_auc", "auc+strict", "pooled_auc+strict",
              "auc+strict+relaxed", "centroid_strict", "centroid_auc",
              "centroid_auc+centroid_strict", "signal_mean", "signal_mean+centroid_strict",
              "signal_mean+strict")
#: A second, smaller per-check level: what the run-level rule leaves a check of a run with
#: ten expected checks (alpha / 10), where the alarms of a real run are decided.
SMALL_LEVEL = 0.005
READINGS = ("strict", "relaxed", "auc")


def population(scenario: str, members: int, non_members: int, g: torch.Generator) -> Any:
    """``[members + non_members, 2]`` features of one pool, members first."""
    m = torch.randn(members, generator=g)
    n = torch.randn(non_members, generator=g)
    if scenario == "mean shift":
        m = m + 0.5
    elif scenario == "memorised outliers":
        far = torch.rand(members, generator=g) < 0.1
        m = torch.where(far, m + 4.0, m)
    elif scenario == "low tail":
        tail = torch.rand(non_members, generator=g) < 0.3
        n = torch.where(tail, n - 3.0, n)
    z = torch.cat([m, n])
    return torch.stack([z, z + 0.3 * torch.randn(len(z), generator=g)], dim=1)


def population_values(scenario: str, seed: int, size: int, episodes: int) -> dict[str, float]:
    """The readings of the population: a very large pool, many episodes."""
    g = torch.Generator().manual_seed(seed)
    feats = population(scenario, size, size, g)
    probe = fh.FeSMIA(episodes=episodes, permutations=1, seed=seed)
    m = probe.attack(feats, size)
    return {"strict": m.strict, "relaxed": m.relaxed, "auc": m.auc}


def run(cfg: Any) -> dict[str, Any]:
    """Power and size of each candidate, and coverage of each interval, per scenario."""
    start = time.perf_counter()
    out: dict[str, Any] = {"config": {
        "mode": cfg.mode, "pools": cfg.stat_pools, "permutations": cfg.stat_permutations,
        "members": 64, "non_members": 64, "alpha": 0.05, "small_level": SMALL_LEVEL,
        "population_size": cfg.stat_population, "population_episodes": cfg.stat_pop_episodes,
    }, "scenarios": {}}
    for s_index, scenario in enumerate(SCENARIOS):
        truth = population_values(scenario, 10_000 + s_index, cfg.stat_population,
                                  cfg.stat_pop_episodes)
        rejects = dict.fromkeys(CANDIDATES, 0)
        rejects_small = dict.fromkeys(CANDIDATES, 0)
        covered = {f"{r}_{kind}": 0 for r in READINGS for kind in ("canary", "episode")}
        widths = {f"{r}_{kind}": [] for r in READINGS for kind in ("canary", "episode")}
        values = {r: [] for r in READINGS}
        for pool in range(cfg.stat_pools):
            g = torch.Generator().manual_seed(1_000_003 * s_index + pool)
            feats = population(scenario, 64, 64, g)
            probe = fh.FeSMIA(permutations=cfg.stat_permutations, seed=pool)
            probe.use_statistics(STATISTICS)  # every candidate, on the same permutations
            m = probe.attack(feats, 64)
            for cand in CANDIDATES:
                observed, null = alarm_statistic(cand, m)
                rank, _ = permutation_p_values(observed, null)
                rejects[cand] += rank / (null.numel() + 1) <= 0.05
                rejects_small[cand] += rank / (null.numel() + 1) <= SMALL_LEVEL
            for r in READINGS:
                value = getattr(m, r)
                values[r].append(value)
                for kind, (lo, hi) in (
                    ("canary", (getattr(m, f"{r}_low"), getattr(m, f"{r}_high"))),
                    ("episode", (getattr(m, f"{r}_episode_low"),
                                 getattr(m, f"{r}_episode_high"))),
                ):
                    covered[f"{r}_{kind}"] += lo <= truth[r] <= hi
                    widths[f"{r}_{kind}"].append((hi - lo) / 2)
        n = cfg.stat_pools
        row: dict[str, Any] = {"population": truth, "rejection": {}, "rejection_small": {},
                               "coverage": {}, "half_width": {}, "spread_across_pools": {}}
        for key, counts in (("rejection", rejects), ("rejection_small", rejects_small)):
            for cand, k in counts.items():
                lo, hi = clopper_pearson(k, n)
                row[key][cand] = {"rate": k / n, "low": lo, "high": hi}
        for key, k in covered.items():
            lo, hi = clopper_pearson(k, n)
            row["coverage"][key] = {"rate": k / n, "low": lo, "high": hi}
            row["half_width"][key] = sum(widths[key]) / n
        for r, vals in values.items():
            mean = sum(vals) / n
            row["spread_across_pools"][r] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        out["scenarios"][scenario] = row
        log.info("statistics: %s done (%.0f s)", scenario, time.perf_counter() - start)
    ranked = rank_statistics(out["scenarios"])  # the rule: see rank_statistics
    out["chosen"] = ranked[0] if ranked else None
    out["seconds"] = time.perf_counter() - start
    return out


if __name__ == "__main__":  # pragma: no cover - a quick look without the harness
    import json
    from types import SimpleNamespace

    logging.basicConfig(level=logging.INFO)
    quick = SimpleNamespace(mode="quick", stat_pools=60, stat_permutations=499,
                            stat_population=4000, stat_pop_episodes=2000)
    print(json.dumps(run(quick), indent=1, default=str))
