"""Items 3-6 on a panel of reference runs: verdicts, fidelity, power, learners, canary kinds.

Every panel run trains one victim and, after every epoch, with the model left untouched:

* runs the default monitor (``FeSMIA()``, ``LeakageBudget(action="alert")``, every epoch);
* runs the **population attack**: a threshold on the logit-scaled confidence over *all*
  members and *all* non-members (AUC, TPR at 1 % FPR, and its expected Log-MIA on random
  15 + 15 query sets, i.e. the population attack read on the probe's own scale);
* times **TensorFlow Privacy's per-epoch callback**, re-done: a threshold attack on the loss
  of the entire training and test sets. Loss and logit-scaled confidence rank samples alike
  (both are monotone in the label's probability; only float32 ties differ), so the verdict
  of the TF Privacy reference is the population attack's verdict;
* keeps the weights at ``alt_checks`` evenly spaced epochs, on which every learner x
  features configuration of item 6 is run afterwards (fewer permutations, see the config).

At the end, online LiRA with the target's recipe and data split gives the strong-attack
verdict. Runs with crafted canaries add mislabeled samples to training and watch them with a
second monitor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import fesmia_hooks as fh
from benchmarks.common import (
    Recipe,
    Workload,
    cnn_workload,
    crosses_budget,
    digits_workload,
    lira,
    median,
    population_attack,
    reaches_band,
    snapshot,
    spearman,
    tfp_reference_check,
    timed,
    train,
)

log = logging.getLogger(__name__)

#: Learner x features configurations compared in item 6.
CONFIGS: tuple[tuple[str, str], ...] = (
    ("simpleshot", "signals"),
    ("simpleshot", "embeddings"),
    ("simpleshot", "both"),
    ("threshold", "signals"),
    ("laplacianshot", "signals"),
    ("laplacianshot", "embeddings"),
    ("laplacianshot", "both"),
    ("finetune", "signals"),
)
#: Configurations cheap enough to run on every canary kind and every placebo run.
CHEAP = {"simpleshot/signals", "simpleshot/embeddings", "simpleshot/both", "threshold/signals"}
#: Left out of item 6: measured once per workload for their cost only.
COST_ONLY: tuple[tuple[str, str], ...] = (("finetune", "embeddings"), ("finetune", "both"))


@dataclass(frozen=True)
class RunSpec:
    """One reference run of the panel."""

    name: str
    kind: str  # "digits" or "cnn"
    label_noise: float
    weight_decay: float = 0.0
    dropout: float = 0.0
    crafted: bool = False


def config_name(method: str, features: str) -> str:
    return f"{method}/{features}"


def make_workload(spec: RunSpec, cfg: Any) -> tuple[Workload, Recipe]:
    crafted = 64 if spec.crafted else 0
    if spec.kind == "digits":
        work = digits_workload(label_noise=spec.label_noise, seed=cfg.seed, dropout=spec.dropout,
                               crafted=crafted, name=spec.name)
        return work, Recipe(epochs=cfg.digits_epochs, weight_decay=spec.weight_decay)
    work = cnn_workload(members=cfg.cnn_members, non_members=cfg.cnn_members, seed=cfg.seed,
                        label_noise=spec.label_noise, dropout=spec.dropout, crafted=crafted,
                        name=spec.name)
    return work, Recipe(epochs=cfg.cnn_epochs, batch_size=64, weight_decay=spec.weight_decay)


def alt_epochs(epochs: int, checks: int) -> list[int]:
    """``checks`` evenly spaced epochs (0-based), the last one included."""
    picks = np.linspace(epochs - 1, (epochs - 1) / max(checks, 1), num=min(checks, epochs))
    return sorted({int(round(v)) for v in picks})


def _probe_row(report: fh.LeakageReport) -> dict[str, Any]:
    return {
        "strict": report.strict,
        "relaxed": report.relaxed,
        "auc": report.auc,
        "members_named": report.members_named,
        "share": report.share_beyond_chance,
        "p_value": report.p_value,
        "p_threshold": report.p_threshold,
        "significant": bool(report.significant),
        "level": report.level.value,
        "breached": bool(report.breached),
        "seconds": report.seconds_total,
    }


def watcher(
    canaries: fh.CanarySet, probe: fh.FeSMIA, statistic: str | None = None
) -> fh.PrivacyMonitor:
    """An alerting monitor of ``canaries`` (the library's alarm statistic unless given)."""
    extra = {} if statistic is None else {"statistic": statistic}
    return fh.PrivacyMonitor(canaries, probe=probe, budget=fh.LeakageBudget(action="alert"),
                             **extra)


def replay(
    work: Workload,
    canaries: fh.CanarySet,
    snapshots: dict[int, dict[str, torch.Tensor]],
    probe: fh.FeSMIA,
    statistic: str | None = None,
) -> list[dict[str, Any]]:
    """A fresh monitor with ``probe`` over the kept weights, one check per kept epoch."""
    monitor = watcher(canaries, probe, statistic)
    model = work.make_model()
    rows = []
    for epoch in sorted(snapshots):
        model.load_state_dict(snapshots[epoch])
        start = time.perf_counter()
        report = monitor.check(model, epoch=epoch)
        wall = time.perf_counter() - start
        assert report is not None
        rows.append({"epoch": epoch, **_probe_row(report), "seconds": wall})
    return rows


def alarm_epoch(rows: list[dict[str, Any]]) -> int | None:
    for row in rows:
        if row["breached"]:
            return int(row["epoch"])
    return None


def summarise(rows: list[dict[str, Any]], pop_by_epoch: dict[int, dict[str, Any]]) -> dict:
    """Fidelity (Spearman rho against the population attack) and the alarm of one replay."""
    epochs = [r["epoch"] for r in rows]
    pop_auc = [pop_by_epoch[e]["auc"] for e in epochs]
    return {
        "epochs": epochs,
        "strict": [r["strict"] for r in rows],
        "relaxed": [r["relaxed"] for r in rows],
        "rho_relaxed": spearman([r["relaxed"] for r in rows], pop_auc),
        "rho_strict": spearman([r["strict"] for r in rows], pop_auc),
        "alarm_epoch": alarm_epoch(rows),
        "alarmed": alarm_epoch(rows) is not None,
        "seconds_per_check": median([r["seconds"] for r in rows]),
    }


def run_one(spec: RunSpec, cfg: Any) -> dict[str, Any]:
    """Train one panel run with every per-epoch measurement, then LiRA and item 6."""
    work, recipe = make_workload(spec, cfg)
    probe_kw = dict(cfg.probe_kwargs)
    statistic = getattr(cfg, "panel_statistic", None)
    monitor = watcher(work.canaries, fh.FeSMIA(seed=cfg.seed, **probe_kw), statistic)
    candidate = watcher(work.canaries, fh.FeSMIA(seed=cfg.seed, **cfg.candidate_probe_kwargs),
                        statistic)
    crafted_set: fh.CanarySet | None = work.extra.get("crafted")
    crafted_monitor = None
    if crafted_set is not None:
        crafted_monitor = watcher(crafted_set, fh.FeSMIA(seed=cfg.seed, **probe_kw), statistic)
    keep = set(alt_epochs(recipe.epochs, cfg.alt_checks))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    checks: list[dict[str, Any]] = []

    def hook(model: torch.nn.Module, epoch: int) -> None:
        start = time.perf_counter()
        report = monitor.step(model, epoch=epoch)
        probe_wall = time.perf_counter() - start
        assert report is not None
        row: dict[str, Any] = {"epoch": epoch, "probe": {**_probe_row(report),
                                                         "seconds": probe_wall}}
        candidate_report = candidate.step(model, epoch=epoch)
        assert candidate_report is not None
        row["candidate"] = _probe_row(candidate_report)
        if crafted_monitor is not None:
            crafted_report = crafted_monitor.step(model, epoch=epoch)
            assert crafted_report is not None
            row["crafted"] = _probe_row(crafted_report)
        row["population"] = population_attack(model, work, seed=cfg.seed,
                                              episodes=cfg.population_episodes)
        seconds, tfp = timed(lambda: tfp_reference_check(model, work.train, work.non_members))
        row["tfp"] = {**tfp, "seconds": seconds}
        checks.append(row)
        if epoch in keep:
            snapshots[epoch] = snapshot(model)

    start = time.perf_counter()
    model = train(work.make_model, work.train, recipe, seed=cfg.seed, on_epoch=hook)
    train_wall = time.perf_counter() - start
    looks = len(checks)
    for row in checks:
        row["population"]["crosses"] = crosses_budget(row["population"], looks=looks)
        row["population"]["moderate"] = reaches_band(row["population"], looks=looks)
    out: dict[str, Any] = {
        "spec": asdict(spec),
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "train_samples": len(work.train[0]),
        "non_members": len(work.non_members[0]),
        "canaries": f"{work.canaries.num_members} + {work.canaries.num_non_members}",
        "seconds_training_with_measurements": train_wall,
        "checks": checks,
    }
    out["summary"] = _run_summary(checks)
    out["candidate_summary"] = _run_summary(checks, key="candidate")
    if cfg.lira_shadows and not spec.crafted:
        shadows = cfg.cnn_lira_shadows if spec.kind == "cnn" else cfg.lira_shadows
        out["lira"] = lira(work, model, recipe, shadows=shadows, seed=cfg.seed)
        log.info("panel %s: LiRA %s", spec.name, out["lira"])
    pop_by_epoch = {row["epoch"]: row["population"] for row in checks}
    out["alt"] = alt_configs(work, work.canaries, snapshots, pop_by_epoch, cfg,
                             cheap_only=False, cost_only=spec.name in cfg.cost_only_runs)
    if crafted_set is not None:
        out["alt_crafted"] = alt_configs(work, crafted_set, snapshots, pop_by_epoch, cfg,
                                         cheap_only=True)
        out["crafted_summary"] = _crafted_summary(checks)
    return out


def alt_configs(
    work: Workload,
    canaries: fh.CanarySet,
    snapshots: dict[int, dict[str, torch.Tensor]],
    pop_by_epoch: dict[int, dict[str, Any]],
    cfg: Any,
    *,
    cheap_only: bool,
    cost_only: bool = False,
) -> dict[str, Any]:
    """Item 6: every learner x features configuration on the kept weights."""
    out: dict[str, Any] = {}
    for method, features in CONFIGS:
        name = config_name(method, features)
        if cheap_only and name not in CHEAP:
            continue
        probe = fh.FeSMIA(method, features=features, embedding_layer=work.embedding_layer,
                          seed=cfg.seed, **cfg.alt_probe_kwargs)
        rows = replay(work, canaries, snapshots, probe, getattr(cfg, "panel_statistic", None))
        out[name] = summarise(rows, pop_by_epoch)
    if cost_only:
        model = work.make_model()
        model.load_state_dict(snapshots[max(snapshots)])
        for method, features in COST_ONLY:
            probe = fh.FeSMIA(method, features=features, embedding_layer=work.embedding_layer,
                              seed=cfg.seed, **cfg.alt_probe_kwargs)
            seconds, _ = timed(lambda p=probe: p.evaluate(model, canaries))
            out[config_name(method, features)] = {"cost_only": True, "seconds_per_check": seconds}
    return out


def _first(rows: list[dict[str, Any]], pred: Any) -> int | None:
    for row in rows:
        if pred(row):
            return int(row["epoch"])
    return None


def _run_summary(checks: list[dict[str, Any]], key: str = "probe") -> dict[str, Any]:
    relaxed = [c[key]["relaxed"] for c in checks]
    strict = [c[key]["strict"] for c in checks]
    pop_auc = [c["population"]["auc"] for c in checks]
    pop_first = _first(checks, lambda c: c["population"]["crosses"])
    alarm = _first(checks, lambda c: c[key]["breached"])
    probe_s = median([c[key]["seconds"] for c in checks])
    tfp_s = median([c["tfp"]["seconds"] for c in checks])
    last = checks[-1]
    return {
        "checks": len(checks),
        "rho_relaxed": spearman(relaxed, pop_auc),
        "rho_strict": spearman(strict, pop_auc),
        "rho_relaxed_vs_population_log_mia": spearman(
            relaxed, [c["population"]["relaxed"] for c in checks]),
        "leaky": bool(checks[-1]["population"].get("moderate", False)),
        "population_first_crossing_epoch": pop_first,
        "probe_first_alarm_epoch": alarm,
        "alarmed": alarm is not None,
        "alarm_delay_epochs": (alarm - pop_first) if alarm is not None and pop_first is not None
        else None,
        "verdict_agreement": float(np.mean(
            [c["population"]["crosses"] == c[key]["breached"] for c in checks])),
        "probe_check_s": probe_s,
        "tfp_check_s": tfp_s,
        "tfp_over_probe": tfp_s / probe_s,
        "final": {
            "probe_strict": last[key]["strict"],
            "probe_relaxed": last[key]["relaxed"],
            "probe_level": last[key]["level"],
            "probe_share": last[key]["share"],
            "probe_members_named": last[key]["members_named"],
            "population_auc": last["population"]["auc"],
            "population_strict": last["population"]["strict"],
            "population_share": last["population"]["share"],
            "population_tpr_at_1pct_fpr": last["population"]["tpr_at_1pct_fpr"],
            "tfp_auc": last["tfp"]["auc"],
            "tfp_advantage": last["tfp"]["advantage"],
        },
    }


def _crafted_summary(checks: list[dict[str, Any]]) -> dict[str, Any]:
    pop_auc = [c["population"]["auc"] for c in checks]
    out = {}
    for kind, key in (("natural", "probe"), ("crafted", "crafted")):
        rows = [dict(c[key], epoch=c["epoch"]) for c in checks]
        out[kind] = {
            "rho_relaxed": spearman([r["relaxed"] for r in rows], pop_auc),
            "alarm_epoch": alarm_epoch(rows),
            "final_strict": rows[-1]["strict"],
            "final_relaxed": rows[-1]["relaxed"],
            "final_auc": rows[-1]["auc"],
            "final_share": rows[-1]["share"],
            "max_strict": max(r["strict"] for r in rows),
        }
    return out


def run(cfg: Any) -> dict[str, Any]:
    runs = []
    for spec in cfg.panel:
        start = time.perf_counter()
        result = run_one(spec, cfg)
        result["seconds_total"] = time.perf_counter() - start
        log.info("panel %s done in %.0f s: %s", spec.name, result["seconds_total"],
                 {k: v for k, v in result["summary"].items() if k != "final"})
        runs.append(result)
    return {
        "runs": runs,
        "candidate_probe": dict(cfg.candidate_probe_kwargs),
        "alt_probe": dict(cfg.alt_probe_kwargs),
        "alt_checks": cfg.alt_checks,
        "population_episodes": cfg.population_episodes,
    }
