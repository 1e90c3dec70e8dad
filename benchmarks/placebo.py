"""Item 5 (honest alarms) and the honesty half of item 6: placebo runs.

A placebo run trains the digits MLP on 300 samples with 20 % label noise (so it does
memorise) and watches canaries that were never trained on: any alarm is a false alarm.
Each run draws its own data split, initialisation and probe seed (``1000 + i``).

* The default monitor (``FeSMIA()``, ``LeakageBudget(action="alert")``) checks after every
  epoch: the false-alarm rate per run, with its exact (Clopper-Pearson) 95 % interval.
* Every learner x features configuration of item 6 is replayed on weights kept at evenly
  spaced epochs; the costly ones on fewer runs (see the config).
* Crafted placebo canaries (held-out samples given a certainly wrong label, never trained
  on) are watched with the cheap configurations.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

import fesmia_hooks as fh
from benchmarks.common import (
    NUM_CLASSES,
    Recipe,
    clopper_pearson,
    digits_workload,
    train,
    wrong_labels,
)
from benchmarks.common import snapshot as keep_weights
from benchmarks.panel import CHEAP, CONFIGS, alarm_epoch, alt_epochs, config_name, replay

log = logging.getLogger(__name__)


def placebo_sets(seed: int) -> tuple[Any, fh.CanarySet, fh.CanarySet]:
    """The training workload and two canary sets that were never trained on."""
    work = digits_workload(label_noise=0.2, seed=seed)
    x, y = work.non_members
    natural = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:128], y[64:128]),
                           num_classes=NUM_CLASSES)
    hx, hy = work.extra["held_out_true_labels"]
    hx, hy = hx[-128:], hy[-128:]  # the far end of the held-out images: no overlap with x[:128]
    wrong = wrong_labels(hy, torch.Generator().manual_seed(seed))
    crafted = fh.CanarySet(members=(hx[:64], wrong[:64]), non_members=(hx[64:], wrong[64:]),
                           num_classes=NUM_CLASSES)
    return work, natural, crafted


def one_run(seed: int, cfg: Any, *, heavy: bool) -> dict[str, Any]:
    work, natural, crafted = placebo_sets(seed)
    monitor = fh.PrivacyMonitor(natural, probe=fh.FeSMIA(seed=seed, **cfg.probe_kwargs),
                                budget=fh.LeakageBudget(action="alert"))
    candidate = fh.PrivacyMonitor(
        natural, probe=fh.FeSMIA(seed=seed, **cfg.candidate_probe_kwargs),
        budget=fh.LeakageBudget(action="alert"))
    keep = set(alt_epochs(cfg.placebo_epochs, cfg.placebo_alt_checks))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def hook(model: torch.nn.Module, epoch: int) -> None:
        monitor.step(model, epoch=epoch)
        candidate.step(model, epoch=epoch)
        if epoch in keep:
            snapshots[epoch] = keep_weights(model)

    train(work.make_model, work.train, Recipe(epochs=cfg.placebo_epochs), seed=seed,
          on_epoch=hook)
    def first_alarm(m: fh.PrivacyMonitor) -> int | None:
        return alarm_epoch([{"epoch": r.epoch, "breached": r.breached} for r in m.history])

    out: dict[str, Any] = {"seed": seed, "checks": monitor.checks,
                           "alarm_epoch": first_alarm(monitor),
                           "candidate_alarm_epoch": first_alarm(candidate),
                           "alt": {}, "alt_crafted": {}}
    for method, features in CONFIGS:
        name = config_name(method, features)
        if name not in CHEAP and not heavy:
            continue
        probe = fh.FeSMIA(method, features=features, embedding_layer=work.embedding_layer,
                          seed=seed, **cfg.alt_probe_kwargs)
        out["alt"][name] = alarm_epoch(replay(work, natural, snapshots, probe))
        if name in CHEAP:
            probe = fh.FeSMIA(method, features=features, embedding_layer=work.embedding_layer,
                              seed=seed, **cfg.alt_probe_kwargs)
            out["alt_crafted"][name] = alarm_epoch(replay(work, crafted, snapshots, probe))
    return out


def rate(alarms: list[bool]) -> dict[str, Any]:
    k, n = sum(alarms), len(alarms)
    lo, hi = clopper_pearson(k, n)
    return {"alarms": k, "runs": n, "rate": k / n if n else float("nan"), "ci95": [lo, hi]}


def run(cfg: Any) -> dict[str, Any]:
    runs = []
    start = time.perf_counter()
    for i in range(cfg.placebo_runs):
        runs.append(one_run(1000 + i, cfg, heavy=i < cfg.placebo_runs_heavy))
        if (i + 1) % 10 == 0:
            log.info("placebo: %d runs, %.0f s", i + 1, time.perf_counter() - start)
    configs: dict[str, Any] = {}
    for method, features in CONFIGS:
        name = config_name(method, features)
        natural = [r["alt"][name] is not None for r in runs if name in r["alt"]]
        crafted = [r["alt_crafted"][name] is not None for r in runs if name in r["alt_crafted"]]
        configs[name] = {"natural": rate(natural), "crafted": rate(crafted) if crafted else None}
    return {
        "workload": ("digits MLP 64-1024-10, 300 training samples with 20 % label noise; "
                     "64 + 64 placebo canaries never trained on"),
        "epochs": cfg.placebo_epochs,
        "seeds": [r["seed"] for r in runs],
        "default": rate([r["alarm_epoch"] is not None for r in runs]),
        "default_checks_per_run": runs[0]["checks"] if runs else 0,
        "candidate": rate([r["candidate_alarm_epoch"] is not None for r in runs]),
        "candidate_probe": dict(cfg.candidate_probe_kwargs),
        "alarm_epochs": [r["alarm_epoch"] for r in runs if r["alarm_epoch"] is not None],
        "configs": configs,
        "alt_checks_per_run": cfg.placebo_alt_checks,
        "heavy_runs": min(cfg.placebo_runs_heavy, cfg.placebo_runs),
        "seconds": time.perf_counter() - start,
    }
