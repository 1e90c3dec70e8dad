"""Item 1: what one privacy check costs against its floor, one forward pass of the canaries.

Measured in one process, interleaved (floor and check repeated, taking turns to run first),
medians of the repeats.
The floor is a side-effect-free forward pass of the whole canary pool through the victim
(what any membership test of those canaries must pay). The check is ``FeSMIA.evaluate``
(forward pass, signals, episodes, the permutation null); ``monitor.check`` adds the run-level
test and the sinks (TensorBoard and the JSON-lines history, written to a temporary folder).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

import fesmia_hooks as fh
from benchmarks.common import (
    NUM_CLASSES,
    Recipe,
    TinyGPT,
    digits_workload,
    make_images,
    median,
    small_cnn,
    timed,
    train,
    wide_cnn,
)
from fesmia_hooks.calibration import alarm_components

log = logging.getLogger(__name__)

# The library's defaults: FeSMIA() draws 999 permutations until a monitor sizes them.
DEFAULTS = {"canaries": 64, "shots": 5, "queries": 15, "episodes": 100, "permutations": 999}
LEARNERS = ("threshold", "simpleshot", "laplacianshot", "finetune")


def _floor(model: nn.Module, canaries: fh.CanarySet) -> float:
    x, _ = canaries.on("cpu")

    def forward() -> None:
        with fh.untouched(model):
            for i in range(0, x.shape[0], 256):
                model(x[i : i + 256])

    return timed(forward)[0]


def ratio_of(
    model: nn.Module,
    canaries: fh.CanarySet,
    probe: fh.FeSMIA,
    repeats: int,
    *,
    with_monitor: bool = False,
    statistic: str | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Median floor, check and their ratio, interleaved; plus the check's own split.

    The check is ``probe.evaluate`` (the library's alarm statistic), or with ``statistic``
    the probe's measurement tested on that one (the probe must compute it). With several
    ``rounds`` of ``repeats``, the medians pool every repeat and ``ratio_rounds`` keeps each
    round's own ratio (the run-to-run noise).
    """

    def check() -> fh.LeakageReport:
        if statistic is None:
            return probe.evaluate(model, canaries)
        return fh.Calibration(statistic=statistic).single_check(probe.measure(model, canaries))

    check()  # warm-up: episode plans, caches
    floors, checks, forwards, attacks, monitor_checks = [], [], [], [], []
    async_checks: list[float] = []
    folder = tempfile.TemporaryDirectory() if with_monitor else None
    monitor = lazy = None
    if folder is not None:
        monitor = fh.PrivacyMonitor(canaries, probe=probe, budget=fh.LeakageBudget(
            action="alert"), log_dir=folder.name)
        monitor.check(model, epoch=0)  # opens the writers
        # The same check with asynchronous=True: what the training thread waits for (the
        # attack runs on another core meanwhile, and is waited for between repeats).
        lazy = fh.PrivacyMonitor(canaries, probe=copy.deepcopy(probe),
                                 budget=fh.LeakageBudget(action="alert"),
                                 log_dir=os.path.join(folder.name, "async"), asynchronous=True)
        lazy.check(model, epoch=0)
        lazy.flush()
    round_ratios: list[float] = []
    try:
        for r in range(repeats * rounds):
            # The two alternate which runs first: whatever ran just before (the previous
            # repeat's checks, the machine's other tenants) weighs on both alike.
            if r % 2 == 0:
                floors.append(_floor(model, canaries))
            seconds, report = timed(check)
            if r % 2 == 1:
                floors.append(_floor(model, canaries))
            checks.append(seconds)
            forwards.append(report.seconds_forward)
            attacks.append(report.seconds_attack)
            if monitor is not None:
                monitor_checks.append(timed(lambda r=r: monitor.check(model, epoch=r + 1))[0])
                monitor.flush()  # its outputs are written in the background: not during the next
            if lazy is not None:
                async_checks.append(timed(lambda r=r: lazy.check(model, epoch=r + 1))[0])
                lazy.flush()
            if (r + 1) % repeats == 0:
                round_ratios.append(median(checks[-repeats:]) / median(floors[-repeats:]))
    finally:
        if monitor is not None:
            monitor.close()
        if lazy is not None:
            lazy.close()
        if folder is not None:
            folder.cleanup()
    out = {
        "floor_s": median(floors),
        "check_s": median(checks),
        "features_s": median(forwards),
        "attack_s": median(attacks),
        "repeats": repeats,
        "rounds": rounds,
    }
    out["ratio"] = out["check_s"] / out["floor_s"]
    if rounds > 1:
        out["ratio_rounds"] = round_ratios
    if monitor_checks:
        out["monitor_check_s"] = median(monitor_checks)
        out["monitor_ratio"] = out["monitor_check_s"] / out["floor_s"]
    if async_checks:
        out["async_check_s"] = median(async_checks)
        out["async_ratio"] = out["async_check_s"] / out["floor_s"]
    return out


def _lm_cost(cfg: Any, seed: int) -> dict[str, Any]:
    """The check next to a GPT-2-shaped model: 64 + 64 sequences of 128 tokens, GPT-2's
    vocabulary (823 M logits in all), the default sequence signals."""
    from fesmia_hooks.text import SequenceSignals, forward_logits

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (128, 128), generator=g)
    canaries = fh.SequenceCanarySet(members=ids[:64], non_members=ids[64:], vocab_size=50257)
    torch.manual_seed(seed)
    model = TinyGPT().eval()
    seq, mask, _ = canaries.sequences_on("cpu")
    passes: list[int] = []
    forward = model.forward

    def counted(x: torch.Tensor) -> torch.Tensor:
        passes.append(x.shape[0])
        return forward(x)

    model.forward = counted  # type: ignore[method-assign]

    def floor() -> None:
        with fh.untouched(model):
            for i in range(0, 128, 32):
                forward_logits(model, seq[i : i + 32], mask[i : i + 32])

    probes = {  # the classification signals per token (the default), and the text attacks'
        "token_means": fh.FeSMIA(seed=seed),
        "sequence": fh.FeSMIA(seed=seed, signal_fn=SequenceSignals()),
    }
    for probe in probes.values():
        probe.evaluate(model, canaries)  # warm-up
    floors: list[float] = []
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in probes}
    for _ in range(max(1, cfg.cost_repeats // 5)):
        floors.append(timed(floor)[0])
        for name, probe in probes.items():
            passes.clear()
            seconds, report = timed(lambda probe=probe: probe.evaluate(model, canaries))
            runs[name].append((seconds, report.seconds_attack, len(passes)))
    out: dict[str, Any] = {
        "what": "GPT-2-shaped LM (vocabulary 50,257, 2 blocks of width 128), 64 + 64 "
                "sequences of 128 tokens",
        "floor_s": median(floors), "repeats": len(floors),
    }
    for name, values in runs.items():
        check = median([v[0] for v in values])
        out[name] = {"check_s": check, "attack_s": median([v[1] for v in values]),
                     "ratio": check / out["floor_s"],
                     "forward_passes_per_check": max(v[2] for v in values)}
    return out


def _cnn_canaries(per_side: int, images: tuple[torch.Tensor, torch.Tensor]) -> fh.CanarySet:
    x, y = images
    return fh.CanarySet(
        members=(x[:per_side], y[:per_side]),
        non_members=(x[per_side : 2 * per_side], y[per_side : 2 * per_side]),
        num_classes=NUM_CLASSES,
    )


def _slope(xs: list[float], ys: list[float]) -> float:
    ok = [(a, b) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0]
    if len(ok) < 2:
        return math.nan
    lx, ly = np.log([a for a, _ in ok]), np.log([b for _, b in ok])
    return float(np.polyfit(lx, ly, 1)[0])


def run(cfg: Any) -> dict[str, Any]:
    """Item 1 on the digits MLP and the CNN; sweeps on the CNN."""
    seed = cfg.seed
    out: dict[str, Any] = {
        "workloads": {},
        "learners": {},
        "sweeps": {},
        "candidates": [],
        "defaults": DEFAULTS,
    }
    # Digits MLP: the demo's model after a few epochs.
    work = digits_workload(label_noise=0.2, seed=seed)
    digits = train(work.make_model, work.train, Recipe(epochs=5), seed=seed)
    probe_kw = dict(cfg.probe_kwargs)
    out["workloads"]["digits_mlp"] = {
        "what": "digits MLP 64-1024-10, 64 + 64 canaries (8x8 inputs)",
        **ratio_of(digits, work.canaries, fh.FeSMIA(seed=seed, **probe_kw), cfg.cost_repeats,
                   with_monitor=True, rounds=cfg.cost_rounds),
    }
    log.info("cost: digits %s", out["workloads"]["digits_mlp"])
    # CNN: 3x32x32 inputs; the weights do not change the cost, so a fresh model is timed.
    per_side_max = max(cfg.cost_sweeps.get("canaries", [64]) + [64])
    images = make_images(2 * per_side_max, seed=seed + 1)
    torch.manual_seed(seed)
    cnn = small_cnn()
    canaries = _cnn_canaries(64, images)
    out["workloads"]["cnn"] = {
        "what": "small CNN (2 conv blocks with BatchNorm, 3x32x32 inputs), 64 + 64 canaries",
        **ratio_of(cnn, canaries, fh.FeSMIA(seed=seed, **probe_kw), cfg.cost_repeats,
                   with_monitor=True, rounds=cfg.cost_rounds),
    }
    log.info("cost: cnn %s", out["workloads"]["cnn"])
    # The same check with the alarm on the episodes' statistics (the previous default):
    # every episode is solved again under each permutation.
    episodic = "auc+strict"
    for name, model, canary_set in (("digits_mlp", digits, work.canaries), ("cnn", cnn, canaries)):
        probe = fh.FeSMIA(seed=seed, **probe_kw)
        probe.use_statistics(alarm_components(episodic))
        out["workloads"][f"{name}_episode_alarm"] = {
            "what": f"{out['workloads'][name]['what']}; alarm statistic `{episodic}`",
            **ratio_of(model, canary_set, probe, cfg.cost_repeats, statistic=episodic),
        }
    log.info("cost: episode alarm %s", out["workloads"]["cnn_episode_alarm"])
    # Context: the same check next to a model whose forward pass costs what real ones do.
    torch.manual_seed(seed)
    if cfg.cost_wide_cnn:
        out["workloads"]["wide_cnn"] = {
            "what": "VGG-style CNN (5 conv layers, 64-256 channels, 3x32x32 inputs), 64 + 64 "
                    "canaries",
            **ratio_of(wide_cnn(), canaries, fh.FeSMIA(seed=seed, **probe_kw),
                       max(1, cfg.cost_repeats // 3)),
        }
        log.info("cost: wide cnn %s", out["workloads"]["wide_cnn"])
    if cfg.cost_lm:
        out["workloads"]["gpt2_shaped"] = _lm_cost(cfg, seed)
        log.info("cost: GPT-2-shaped %s", out["workloads"]["gpt2_shaped"])
    for method in LEARNERS:
        heavy = method in ("laplacianshot", "finetune")
        reps = cfg.cost_learner_repeats if heavy else cfg.cost_repeats
        probe = fh.FeSMIA(method, seed=seed, **probe_kw)
        out["learners"][method] = ratio_of(cnn, canaries, probe, reps)
        log.info("cost: learner %s %.1fx", method, out["learners"][method]["ratio"])
    base = {k: v for k, v in DEFAULTS.items() if k != "canaries"}
    base.update({k: v for k, v in probe_kw.items() if k in base})
    for param, values in cfg.cost_sweeps.items():
        rows = []
        for value in values:
            kw = dict(base)
            per_side = DEFAULTS["canaries"]
            if param == "canaries":
                per_side = value
            else:
                kw[param] = value
            if kw["shots"] + kw["queries"] > per_side:
                continue
            probe = fh.FeSMIA(seed=seed, **kw)
            r = ratio_of(cnn, _cnn_canaries(per_side, images), probe, cfg.cost_sweep_repeats)
            rows.append({"value": value, **r})
        out["sweeps"][param] = {
            "rows": rows,
            "loglog_slope": _slope([r["value"] for r in rows], [r["check_s"] for r in rows]),
        }
        log.info("cost: sweep %s slope %.2f", param, out["sweeps"][param]["loglog_slope"])
    # How much of a check is the permutation null: a straight line through the sweep.
    perm_rows = out["sweeps"].get("permutations", {}).get("rows", [])
    if len(perm_rows) >= 2:
        b = np.array([r["value"] for r in perm_rows], dtype=float)
        t = np.array([r["check_s"] for r in perm_rows])
        slope, intercept = np.polyfit(b, t, 1)
        at_default = intercept + slope * DEFAULTS["permutations"]
        out["null_share_at_default"] = float(slope * DEFAULTS["permutations"] / at_default)
        out["seconds_per_permutation"] = float(slope)
    for kw in cfg.cost_candidates:
        probe = fh.FeSMIA(seed=seed, **kw)
        r = ratio_of(cnn, canaries, probe, cfg.cost_sweep_repeats)
        out["candidates"].append({"settings": kw, **r})
    return out
