"""Item 2 (training overhead) and the cost half of item 3 (TF Privacy's per-epoch attack).

Each workload is trained with and without the monitor, same seed, alternating which goes
first, ``repeats`` times. Two ratios are reported:

* **A/B**: median wall time with the monitor / median wall time without it. This is the
  figure the target speaks of, and on a shared machine it carries the machine's noise.
* **in-run**: within each monitored run, total time / (total time - time spent in
  ``monitor.step``). Both parts are timed in the same process seconds apart, so this ratio
  is far less noisy; it is the better estimate of the monitor's share.

The monitor runs at its default cadence (every epoch) with the default probe, the default
budget (with ``action="alert"``, so both runs train the same number of epochs) and its
default outputs (TensorBoard events and the history file, in a temporary folder). The two
runs must end with bit-identical weights (docs/science.md#side-effects); that is checked
and recorded.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch

import fesmia_hooks as fh
from benchmarks.common import (
    Recipe,
    Workload,
    cnn_workload,
    digits_workload,
    median,
    tfp_reference_check,
    timed,
    train,
)

log = logging.getLogger(__name__)


def _train_once(
    work: Workload, recipe: Recipe, seed: int, probe_kw: dict[str, Any], monitored: bool
) -> tuple[float, float, int, dict[str, torch.Tensor], torch.nn.Module]:
    monitor_seconds = 0.0
    folder = tempfile.TemporaryDirectory()
    monitor = None
    if monitored:
        monitor = fh.PrivacyMonitor(
            work.canaries,
            probe=fh.FeSMIA(seed=seed, **probe_kw),
            budget=fh.LeakageBudget(action="alert"),
            log_dir=folder.name,
        )

    def hook(model: torch.nn.Module, epoch: int) -> None:
        nonlocal monitor_seconds
        if monitor is not None:
            start = time.perf_counter()
            monitor.step(model, epoch=epoch)
            monitor_seconds += time.perf_counter() - start

    start = time.perf_counter()
    model = train(work.make_model, work.train, recipe, seed=seed, on_epoch=hook)
    total = time.perf_counter() - start
    checks = 0
    if monitor is not None:
        checks = monitor.checks
        monitor.close()
    folder.cleanup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return total, monitor_seconds, checks, state, model


def measure(
    work: Workload,
    recipe: Recipe,
    *,
    seed: int,
    repeats: int,
    probe_kw: dict[str, Any],
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    plain, monitored, inrun, checks = [], [], [], 0
    identical = True
    model = None
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        states = {}
        for flag in order:
            total, spent, n, state, model = _train_once(work, recipe, seed, probe_kw, flag)
            states[flag] = state
            if flag:
                monitored.append(total)
                inrun.append(total / (total - spent))
                checks = n
            else:
                plain.append(total)
        identical &= all(torch.equal(states[False][k], states[True][k]) for k in states[False])
    assert model is not None
    # Cost of one check against TF Privacy's per-epoch attack on the final model.
    probe = fh.FeSMIA(seed=seed, **probe_kw)
    probe.evaluate(model, work.canaries)
    reps = max(3, repeats)
    probe_s = median([timed(lambda: probe.evaluate(model, work.canaries))[0] for _ in range(reps)])
    tfp_s = median([timed(lambda: tfp_reference_check(model, work.train, test))[0]
                    for _ in range(reps)])
    epoch_s = median(plain) / recipe.epochs
    return {
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "train_samples": len(work.train[0]),
        "test_samples": len(test[0]),
        "checks_per_run": checks,
        "repeats": repeats,
        "seconds_without": median(plain),
        "seconds_with": median(monitored),
        "ratio_ab": median(monitored) / median(plain),
        "ratio_in_run": median(inrun),
        "weights_identical": bool(identical),
        "seconds_per_epoch": epoch_s,
        "probe_check_s": probe_s,
        "tfp_check_s": tfp_s,
        "tfp_over_probe": tfp_s / probe_s,
        "tfp_overhead_ratio": (epoch_s + tfp_s) / epoch_s,
    }


def run(cfg: Any) -> dict[str, Any]:
    seed = cfg.seed
    probe_kw = dict(cfg.probe_kwargs)
    out: dict[str, Any] = {}
    work = digits_workload(label_noise=0.2, seed=seed)
    out["digits_mlp"] = {
        "what": "digits MLP 64-1024-10, 300 training samples (20 % label noise), batch 32",
        **measure(work, Recipe(epochs=cfg.overhead_digits_epochs), seed=seed,
                  repeats=cfg.overhead_repeats, probe_kw=probe_kw, test=work.non_members),
    }
    log.info("overhead: digits %s", out["digits_mlp"])
    work = cnn_workload(members=cfg.overhead_cnn_members, non_members=cfg.overhead_cnn_test,
                        seed=seed, label_noise=0.2)
    out["cnn"] = {
        "what": (f"small CNN, {cfg.overhead_cnn_members:,} generated 3x32x32 training samples "
                 f"(20 % label noise), batch 64; TF Privacy's test set: "
                 f"{cfg.overhead_cnn_test:,} held-out samples"),
        **measure(work, Recipe(epochs=cfg.overhead_cnn_epochs, batch_size=64), seed=seed,
                  repeats=cfg.overhead_repeats, probe_kw=probe_kw, test=work.non_members),
    }
    log.info("overhead: cnn %s", out["cnn"])
    return out
