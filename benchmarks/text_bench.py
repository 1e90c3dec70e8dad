"""Language-model rows: fidelity of the probe against a population attack, and its cost.

    python benchmarks/text_bench.py [--quick]      # prints the dict as JSON

The victim is the text demo's character-level GRU on passages of CPython's bundled reference
manual (``fesmia_hooks.demos.text_demo``): 256 passages trained on, 256 never trained on,
64 + 64 of them the canaries. It trains for ``epochs`` epochs with no stop. After every
epoch:

* the probe, twice -- on the sequence signals (``SequenceSignals()``: mean log-likelihood,
  Min-K% prob, zlib ratio) and on the default signals averaged per token (``FeSMIA()``) --
  each inside its own ``PrivacyMonitor`` (run-level calibrated significance, default budget
  with ``action="alert"``);
* the population attack: a threshold on each sequence signal over *all* 256 member and 256
  non-member passages (AUC, TPR at 1 % FPR) and, for mean log-likelihood, its expected
  Log-MIA over random 15 + 15 query sets (the probe's own scale).

Fidelity is Spearman's rho between the probe's readings and the population AUC across
epochs, and the epochs at which each first crosses the default budget. Cost compares, on
the final model, one whole check with the unavoidable floor (one side-effect-free forward
pass of the 128 canary passages) and with one training epoch, medians of interleaved runs
(floor and check alternate which runs first).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

import fesmia_hooks as fh
from fesmia_hooks.demos.text_demo import PAD, CharGRU, make_text_task, train_epoch
from fesmia_hooks.logmia import batched_log_mia
from fesmia_hooks.text import SequenceSignals, forward_logits, zlib_lengths

__all__ = ["run_text_benchmark"]

_POP_SIGNALS = ("log_prob", "min_k", "zlib")


def _auc(members: np.ndarray, non_members: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return float(roc_auc_score(labels, np.r_[members, non_members]))


def _tpr_at(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    f, t, _ = roc_curve(labels, np.r_[members, non_members], drop_intermediate=False)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _expected_log_mia(
    members: np.ndarray, non_members: np.ndarray, picks: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """Mean (strict, relaxed) Log-MIA of the threshold attack over fixed random query sets."""
    mi, ni = picks
    m, nm = torch.as_tensor(members, dtype=torch.float64), torch.as_tensor(non_members,
                                                                           dtype=torch.float64)
    scores = torch.cat([m[mi], nm[ni]], dim=1)
    is_member = torch.zeros(scores.shape[1], dtype=torch.bool)
    is_member[: mi.shape[1]] = True
    strict, relaxed = batched_log_mia(scores, is_member)
    return float(strict.mean()), float(relaxed.mean())


def _population_signals(
    model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], sizes: torch.Tensor
) -> np.ndarray:
    ids, targets = data
    spec = SequenceSignals(_POP_SIGNALS)
    out = []
    with fh.untouched(model):
        for i in range(0, len(ids), 128):
            block = slice(i, i + 128)
            out.append(spec.reduce(model(ids[block]), targets[block], zlib_bytes=sizes[block]))
    return torch.cat(out).numpy()


def run_text_benchmark(
    *,
    epochs: int = 40,
    seed: int = 0,
    repeats: int = 15,
    population_episodes: int = 2000,
    threads: int = 1,
    cost_rounds: int = 5,
) -> dict[str, Any]:
    """Train the text demo's GRU without stopping; read probe and population every epoch.

    Args:
        epochs: Epochs to train (every one is checked).
        seed: Seed of the split, the model, the shuffling and the probes.
        repeats: Interleaved repeats of the cost measurement, per round.
        cost_rounds: Rounds of the cost measurement (their spread is reported).
        population_episodes: Random 15 + 15 query sets of the population's expected Log-MIA.
        threads: ``torch.set_num_threads`` during the run (restored after).

    Returns:
        ``{"config", "machine", "epochs": [per-epoch rows], "fidelity", "cost"}``; see the
        module docstring.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(epochs=epochs, seed=seed, repeats=repeats,
                    population_episodes=population_episodes, cost_rounds=cost_rounds)
    finally:
        torch.set_num_threads(previous)


def _run(
    *, epochs: int, seed: int, repeats: int, population_episodes: int, cost_rounds: int
) -> dict[str, Any]:
    torch.manual_seed(seed)
    task = make_text_task(seed=seed)
    sizes = {
        name: zlib_lengths(ids, (ids != PAD).long(),
                           decode=lambda t: "".join(task.vocab[i] for i in t))
        for name, (ids, _) in (("train", task.train), ("held_out", task.held_out))
    }
    model = CharGRU(task.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    probes = {
        "sequence": fh.FeSMIA(signal_fn=SequenceSignals(), seed=seed),
        "token_means": fh.FeSMIA(seed=seed),
    }
    monitors = {
        name: fh.PrivacyMonitor(task.canaries, probe=probe,
                                budget=fh.LeakageBudget(action="alert"), horizon=epochs)
        for name, probe in probes.items()
    }
    g = torch.Generator().manual_seed(seed)
    n_m, n_n = len(task.train[0]), len(task.held_out[0])
    picks = (torch.rand(population_episodes, n_m, generator=g).argsort(1)[:, :15],
             torch.rand(population_episodes, n_n, generator=g).argsort(1)[:, :15])
    rows = []
    epoch_seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        loss = train_epoch(model, optimizer, task.train)
        epoch_seconds.append(time.perf_counter() - start)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss}
        for name, monitor in monitors.items():
            report = monitor.check(model, epoch=epoch)
            assert report is not None
            row[name] = {
                "strict": report.strict, "relaxed": report.relaxed, "auc": report.auc,
                "p_value": report.p_value, "p_threshold": report.p_threshold,
                "significant": report.significant, "level": report.level.value,
                "breached": report.breached,
            }
        members = _population_signals(model, task.train, sizes["train"])
        non_members = _population_signals(model, task.held_out, sizes["held_out"])
        population: dict[str, Any] = {}
        for j, name in enumerate(_POP_SIGNALS):
            population[name] = {
                "auc": _auc(members[:, j], non_members[:, j]),
                "tpr_at_1pct_fpr": _tpr_at(members[:, j], non_members[:, j], 0.01),
            }
        strict, relaxed = _expected_log_mia(members[:, 0], non_members[:, 0], picks)
        population["log_prob"].update(expected_strict=strict, expected_relaxed=relaxed)
        row["held_out_nll"] = float(-non_members[:, 0].mean())
        row["train_nll"] = float(-members[:, 0].mean())
        row["population"] = population
        rows.append(row)
    fidelity = _fidelity(rows, list(probes))
    cost = _cost(model, task.canaries, probes, repeats, statistics.median(epoch_seconds),
                 rounds=cost_rounds)
    return {
        "config": {"epochs": epochs, "seed": seed, "members": n_m, "non_members": n_n,
                   "canaries_per_side": task.canaries.num_members,
                   "probes": {k: repr(p) for k, p in probes.items()},
                   "sequence_signals": repr(probes["sequence"].signal_fn),
                   "population_episodes": population_episodes,
                   "torch_threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "epochs": rows,
        "fidelity": fidelity,
        "cost": cost,
    }


def _first(flags: list[bool]) -> int | None:
    return next((i for i, f in enumerate(flags) if f), None)


def _fidelity(rows: list[dict[str, Any]], probes: list[str]) -> dict[str, Any]:
    pop_auc = [r["population"]["log_prob"]["auc"] for r in rows]
    pop_strict = [r["population"]["log_prob"]["expected_strict"] for r in rows]
    out: dict[str, Any] = {
        "population_auc_first_last": [pop_auc[0], pop_auc[-1]],
        # the population's expected strict Log-MIA reaches the default budget's band (0.25)
        "population_crosses_budget_epoch": _first([s >= 0.25 for s in pop_strict]),
    }
    for name in probes:
        probe_rows = [r[name] for r in rows]
        out[name] = {
            "spearman_relaxed_vs_population_auc": _spearman(
                [p["relaxed"] for p in probe_rows], pop_auc),
            "spearman_auc_vs_population_auc": _spearman([p["auc"] for p in probe_rows], pop_auc),
            "spearman_strict_vs_population_expected_strict": _spearman(
                [p["strict"] for p in probe_rows], pop_strict),
            "first_significant_epoch": _first([p["significant"] for p in probe_rows]),
            "first_breach_epoch": _first([p["breached"] for p in probe_rows]),
            "population_auc_at_first_breach": (
                None if _first([p["breached"] for p in probe_rows]) is None
                else pop_auc[_first([p["breached"] for p in probe_rows])]),  # type: ignore[index]
        }
    return out


# Per probe, each repeat's (check, features, attack, asynchronous wait) seconds.
_Checks = dict[str, list[tuple[float, float, float, float]]]


def _cost(
    model: torch.nn.Module,
    canaries: fh.CanarySet,
    probes: dict[str, fh.FeSMIA],
    repeats: int,
    epoch_s: float,
    rounds: int = 1,
) -> dict[str, Any]:
    """Floor, check and asynchronous wait, ``rounds`` times ``repeats`` interleaved repeats.

    The ratios are of the medians over every repeat of every round; ``ratio_rounds`` keeps
    each round's own ratio (its spread is the measurement's run-to-run noise here).
    """
    ids, mask, _ = canaries.sequences_on("cpu")

    def floor() -> float:
        start = time.perf_counter()
        with fh.untouched(model):
            forward_logits(model, ids, mask)
        return time.perf_counter() - start

    def one_round() -> tuple[list[float], _Checks]:
        """The floors, and per probe ``(check, features, attack, asynchronous wait)``."""
        # The same probes in asynchronous monitors: what the training thread waits for.
        lazy = {name: fh.PrivacyMonitor(canaries, probe=copy.deepcopy(probe), budget=None,
                                        asynchronous=True) for name, probe in probes.items()}
        for name, probe in probes.items():
            probe.evaluate(model, canaries)  # warm-up: episode plans, caches
            lazy[name].check(model, epoch=0)
            lazy[name].flush()
        floors: list[float] = []
        checks: _Checks = {name: [] for name in probes}
        for r in range(repeats):
            for name, probe in probes.items():
                # Floor and check alternate which runs first (see benchmarks.cost.ratio_of).
                if r % 2 == 0:
                    floors.append(floor())
                start = time.perf_counter()
                report = probe.evaluate(model, canaries)
                check_s = time.perf_counter() - start
                if r % 2 == 1:
                    floors.append(floor())
                start = time.perf_counter()
                lazy[name].check(model, epoch=r + 1)
                wait_s = time.perf_counter() - start
                lazy[name].flush()
                checks[name].append((check_s, report.seconds_forward, report.seconds_attack,
                                     wait_s))
        for monitor in lazy.values():
            monitor.close()
        return floors, checks

    per_round = [one_round() for _ in range(rounds)]
    floors = [f for r in per_round for f in r[0]]
    out: dict[str, Any] = {"train_epoch_s": epoch_s, "repeats": repeats, "rounds": rounds,
                           "floor_s": statistics.median(floors)}
    for name in probes:
        values = [v for r in per_round for v in r[1][name]]
        check_s = statistics.median(v[0] for v in values)
        wait_s = statistics.median(v[3] for v in values)
        out[name] = {
            "check_s": check_s,
            "features_s": statistics.median(v[1] for v in values),
            "attack_s": statistics.median(v[2] for v in values),
            "ratio_to_floor": check_s / out["floor_s"],
            "ratio_rounds": [statistics.median(v[0] for v in r[1][name])
                             / statistics.median(r[0]) for r in per_round],
            "share_of_train_epoch": check_s / epoch_s,
            "async_wait_s": wait_s,
            "async_ratio_to_floor": wait_s / out["floor_s"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 epochs, 5 repeats")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (20 if args.quick else 40)
    result = run_text_benchmark(epochs=epochs, repeats=5 if args.quick else 15)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
