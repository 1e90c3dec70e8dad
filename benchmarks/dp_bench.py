"""Differential privacy in the loop: the audit's ε lower bound beside the accountant's ε.

    python benchmarks/dp_bench.py [--quick]      # prints the dict as JSON

The victim is the digits MLP (64-1024-10) on scikit-learn's digits, trained with DP-SGD
(Opacus: per-sample clipping at norm 1, Gaussian noise sized by
``make_private_with_epsilon`` for each target ε at δ = 1e-5 over the run's epochs, Poisson
sampling, RDP accountant, SGD) and without DP (Adam, the same epochs and batch size).
``canaries`` held-out digits with a certainly wrong label are put into training each by its
own fair coin (``CanarySet.for_audit``: the one-run audit's design); 300 other digits are
the test set. A ``PrivacyMonitor`` with the engine as its ``accountant`` reads after every
epoch the accountant's ε, the audit's lower bound (95 %, δ = 1e-5) and the probe's Log-MIA.

Per run: both ε after every epoch, whether the bound ever passed the accountant's ε (a
broken DP implementation would), the final Log-MIA readings and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fesmia_hooks as fh
from benchmarks.common import _digits_arrays, digits_model
from fesmia_hooks.epsilon import best_attainable_epsilon

DELTA = 1e-5
TEST = 300
BATCH = 128


def _split(canaries: int, seed: int) -> tuple[Any, fh.CanarySet, Any]:
    x, y = _digits_arrays()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    pool, test, train = order[:canaries], order[canaries:canaries + TEST], order[canaries + TEST:]
    (xc, yc), audit = fh.CanarySet.for_audit((x[pool], y[pool]), num_classes=10, size=canaries,
                                             seed=seed)
    train_set = (torch.cat([x[train], xc]), torch.cat([y[train], yc]))
    return train_set, audit, (x[test], y[test])


def run_one(target: float | None, *, canaries: int, epochs: int, seed: int,
            probe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One training run at ``target`` ε (``None``: no DP), watched after every epoch."""
    from opacus import PrivacyEngine

    train_set, audit, (x_test, y_test) = _split(canaries, seed)
    torch.manual_seed(seed)
    model = digits_model()
    loader = DataLoader(TensorDataset(*train_set), batch_size=BATCH, shuffle=True)
    engine = None
    if target is None:
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():  # Opacus's notes on secure RNG and hooks
            warnings.simplefilter("ignore")
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                data_loader=loader, target_epsilon=target, target_delta=DELTA, epochs=epochs,
                max_grad_norm=1.0)
    monitor = fh.PrivacyMonitor(audit, probe=fh.FeSMIA(**probe_kwargs), accountant=engine,
                                delta=DELTA, budget=None)
    rows = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling may draw an empty batch
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        r = monitor.step(model, epoch=epoch)
        assert r is not None
        rows.append({"epoch": epoch, "epsilon_accountant": r.epsilon_accountant,
                     "epsilon_lower_bound": r.epsilon_lower_bound, "strict": r.strict,
                     "relaxed": r.relaxed, "auc": r.auc, "p_value": r.p_value,
                     "significant": r.significant, "level": r.level.value})
    seconds = time.perf_counter() - start
    monitor.close()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    last = rows[-1]
    above = [row["epoch"] for row in rows
             if math.isfinite(row["epsilon_accountant"])
             and row["epsilon_lower_bound"] > row["epsilon_accountant"]]
    first_sig = next((row["epoch"] for row in rows if row["significant"]), None)
    return {
        "target": target, "seed": seed, "members": audit.num_members,
        "non_members": audit.num_non_members, "accuracy": accuracy, "seconds": seconds,
        "final": last, "max_lower_bound": max(row["epsilon_lower_bound"] for row in rows),
        "bound_above_accountant_epochs": above, "first_significant_epoch": first_sig,
        "epochs": rows,
    }


def run_dp_benchmark(*, targets: tuple[float, ...], canaries: int, epochs: int,
                     seeds: int, seed: int = 0,
                     probe_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every target ε (and no DP) over ``seeds`` seeds."""
    kwargs = dict(probe_kwargs or {})
    runs = [run_one(t, canaries=canaries, epochs=epochs, seed=seed + s, probe_kwargs=kwargs)
            for s in range(seeds) for t in (None, *targets)]
    summary = []
    for t in (None, *targets):
        mine = [r for r in runs if r["target"] == t]
        summary.append({
            "target": t,
            "runs": len(mine),
            "accountant_final": float(np.mean([r["final"]["epsilon_accountant"] for r in mine]))
            if t is not None else None,
            "lower_bound_final": [r["final"]["epsilon_lower_bound"] for r in mine],
            "lower_bound_max": [r["max_lower_bound"] for r in mine],
            "strict_final": float(np.mean([r["final"]["strict"] for r in mine])),
            "relaxed_final": float(np.mean([r["final"]["relaxed"] for r in mine])),
            "auc_final": float(np.mean([r["final"]["auc"] for r in mine])),
            "significant_runs": sum(r["first_significant_epoch"] is not None for r in mine),
            "accuracy": float(np.mean([r["accuracy"] for r in mine])),
            "runs_with_bound_above_accountant": sum(bool(r["bound_above_accountant_epochs"])
                                                    for r in mine),
            "seconds": float(np.mean([r["seconds"] for r in mine])),
        })
    return {
        "config": {"targets": list(targets), "canaries": canaries, "epochs": epochs,
                   "seeds": seeds, "delta": DELTA, "confidence": 0.95, "batch": BATCH,
                   "test": TEST, "max_grad_norm": 1.0},
        "best_attainable": {m: best_attainable_epsilon(m) for m in
                            (50, 100, 200, 500, 1000, 2000, 5000, 10000)},
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {"canaries": 300, "epochs": 20, "seeds": 1} if args.quick else {
        "canaries": 500, "epochs": 60, "seeds": 3}
    print(json.dumps(run_dp_benchmark(targets=(1.0, 4.0, 8.0), **sizes), indent=1))


if __name__ == "__main__":
    main()
