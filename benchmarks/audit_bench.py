"""Data audit after training: does ``fesmia_hooks.audit.audit`` tell trained-on sets apart?

    python benchmarks/audit_bench.py [--quick]      # prints the dict as JSON

For each seed the data are split at random into a *base* training set, a pool of suspects
(the largest suspect-set size), ``non_members`` known non-members and the rest (never trained
on by any model of the seed). Models are trained with the same recipe and seed:

* *without*: on the base set only;
* *with*: on the base set plus the first ``k`` suspects, one model per size ``k``
  (``nested=False``), or one model on the base set plus the whole pool whose first ``k``
  suspects are audited at every size (``nested=True``: the cheaper design, used for the text
  GRU, where the audited set is a subset of the extra data).

Every size's first ``k`` suspects are audited against the same non-members on the *with* and
the *without* model: the share of seeds where the verdict is "shown" is the power (with) and
the false-positive rate (without), each with its exact 95 % (Clopper-Pearson) interval.
The *placebo* audits draw 50 suspects and ``non_members`` non-members at random from samples
that no model of the seed was trained on, on both models: nothing leaks by construction, so
"shown" there is a false positive whatever the model learnt.

Two victims:

* **digits**: the MLP 64-1024-10 on scikit-learn's digits (clean labels), Adam (lr 1e-3),
  batch 64, ``digits_epochs`` epochs on 300 digits (+ suspects): it reaches 100 % training
  accuracy and generalises (held-out accuracy in the results), as a small network trained
  to convergence does;
* **text**: the text demo's character-level GRU (``CharGRU``: embedding 48, GRU 256) on
  passages of CPython's ``pydoc_data.topics``, the demo's ``train_epoch`` (Adam 3e-3, batch
  32, gradient norm clipped at 1), ``text_epochs`` epochs: briefly, its held-out loss still
  falling (both losses are in the results).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import Recipe, _digits_arrays, clopper_pearson, digits_model, train
from fesmia_hooks.audit import audit

__all__ = ["run_audit_benchmark"]

PLACEBO_SUSPECTS = 50
DIGITS_BATCH = 64
DIGITS_LR = 1e-3
TEXT_LR = 3e-3


# --------------------------------------------------------------------------- one audit
def _audit(model: nn.Module, suspects: Any, non_members: Any, *, permutations: int, seed: int,
           **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    r = audit(model, suspects, non_members, permutations=permutations, seed=seed, **options)
    return {"shown": r.shown, "p_value": r.p_value, "auc": r.effect_auc,
            "auc_low": r.effect_auc_low, "auc_high": r.effect_auc_high,
            "seconds": time.perf_counter() - start}


def _split(n: int, base: int, pool: int, non_members: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = np.cumsum([base, pool, non_members])
    if cut[-1] + PLACEBO_SUSPECTS > n:
        raise ValueError(f"{n} samples cannot hold base {base}, pool {pool}, non-members "
                         f"{non_members} and {PLACEBO_SUSPECTS} placebo suspects")
    return {"base": order[:cut[0]], "pool": order[cut[0]:cut[1]],
            "non_members": order[cut[1]:cut[2]], "rest": order[cut[2]:]}


def _seed_runs(
    *,
    split: dict[str, np.ndarray],
    sizes: Sequence[int],
    nested: bool,
    fit: Callable[[np.ndarray], tuple[nn.Module, dict[str, float]]],
    side: Callable[[np.ndarray], Any],
    options: dict[str, Any],
    permutations: int,
    placebo_draws: int,
    seed: int,
) -> dict[str, Any]:
    """Train the seed's models, audit every size on *with* and *without*, and the placebos."""
    base, pool, held = split["base"], split["pool"], split["non_members"]
    non_members = side(held)
    train_s = 0.0
    start = time.perf_counter()
    without, without_fit = fit(base)
    train_s += time.perf_counter() - start
    models: dict[int, tuple[nn.Module, dict[str, float]]] = {}
    for k in ([max(sizes)] if nested else sizes):
        start = time.perf_counter()
        models[k] = fit(np.concatenate([base, pool[:k]]))
        train_s += time.perf_counter() - start
    rows: dict[str, dict[str, Any]] = {"with": {}, "without": {}}
    for k in sizes:
        suspects = side(pool[:k])
        model = models[max(sizes) if nested else k][0]
        rows["with"][str(k)] = _audit(model, suspects, non_members, permutations=permutations,
                                      seed=seed, **options)
        rows["without"][str(k)] = _audit(without, suspects, non_members,
                                         permutations=permutations, seed=seed, **options)
    # placebo: suspects and non-members both from data no model of this seed trained on
    never = np.concatenate([held, split["rest"]])
    rng = np.random.default_rng(seed + 10_007)
    placebo = []
    for name, model in (("without", without), ("with", models[max(sizes)][0])):
        for d in range(placebo_draws):
            pick = rng.permutation(never)[: PLACEBO_SUSPECTS + len(held)]
            row = _audit(model, side(pick[:PLACEBO_SUSPECTS]), side(pick[PLACEBO_SUSPECTS:]),
                         permutations=permutations, seed=seed * 1000 + d, **options)
            placebo.append({"model": name, **row})
    fits = {"without": without_fit, **{f"with_{k}": f for k, (_, f) in models.items()}}
    return {"seed": seed, "train_seconds": train_s, "fit": fits, **rows, "placebo": placebo}


# --------------------------------------------------------------------------- victims
def _digits(*, sizes: Sequence[int], non_members: int, base: int, epochs: int, seed: int,
            permutations: int, placebo_draws: int) -> dict[str, Any]:
    x, y = _digits_arrays()
    split = _split(len(x), base, max(sizes), non_members, seed)
    test = torch.as_tensor(split["rest"])
    recipe = Recipe(epochs=epochs, batch_size=DIGITS_BATCH, lr=DIGITS_LR)

    def fit(idx: np.ndarray) -> tuple[nn.Module, dict[str, float]]:
        i = torch.as_tensor(idx)
        model = train(digits_model, (x[i], y[i]), recipe, seed=seed)
        model.eval()
        with torch.no_grad():
            acc_train = float((model(x[i]).argmax(1) == y[i]).float().mean())
            acc_test = float((model(x[test]).argmax(1) == y[test]).float().mean())
        return model, {"train_accuracy": acc_train, "held_out_accuracy": acc_test}

    def side(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx)
        return x[i], y[i]

    return _seed_runs(split=split, sizes=sizes, nested=False, fit=fit, side=side,
                      options={"num_classes": 10}, permutations=permutations,
                      placebo_draws=placebo_draws, seed=seed)


def _text(*, sizes: Sequence[int], non_members: int, base: int, epochs: int, seed: int,
          permutations: int, placebo_draws: int, nested: bool) -> dict[str, Any]:
    from fesmia_hooks.demos.text_demo import (
        PAD,
        CharGRU,
        encode,
        lm_loss,
        load_pydoc_passages,
        pad_batch,
        train_epoch,
    )

    passages = load_pydoc_passages()
    vocab = ["<pad>", *sorted({c for p in passages for c in p})]
    ids = encode(passages, {c: i for i, c in enumerate(vocab)})
    split = _split(len(ids), base, max(sizes), non_members, seed)
    # held-out loss on (at most) 200 passages no model of the seed trains on
    held_out = pad_batch([ids[i] for i in split["rest"][:200]])

    def nll(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
        model.eval()
        with torch.no_grad():
            return float(lm_loss(model, *data))

    def fit(idx: np.ndarray) -> tuple[nn.Module, dict[str, float]]:
        data = pad_batch([ids[i] for i in idx])
        torch.manual_seed(seed)
        model = CharGRU(len(vocab))
        optimizer = torch.optim.Adam(model.parameters(), lr=TEXT_LR)
        for _ in range(epochs):
            train_epoch(model, optimizer, data)
        return model, {"train_nll": nll(model, data), "held_out_nll": nll(model, held_out)}

    def side(idx: np.ndarray) -> list[list[int]]:
        return [ids[i] for i in idx]

    out = _seed_runs(split=split, sizes=sizes, nested=nested, fit=fit, side=side,
                     options={"pad_token_id": PAD, "vocab_size": len(vocab)},
                     permutations=permutations, placebo_draws=placebo_draws, seed=seed)
    out["passages"] = len(ids)
    return out


# --------------------------------------------------------------------------- summaries
def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = int(sum(flags)), len(flags)
    low, high = clopper_pearson(k, n)
    return {"shown": k, "runs": n, "rate": k / n if n else float("nan"), "low": low,
            "high": high}


def _summarise(runs: list[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    rows = []
    for k in sizes:
        row: dict[str, Any] = {"size": k}
        for cond in ("with", "without"):
            cells = [r[cond][str(k)] for r in runs]
            row[cond] = {
                **_rate([c["shown"] for c in cells]),
                "auc_mean": float(np.mean([c["auc"] for c in cells])),
                "auc_min": float(np.min([c["auc"] for c in cells])),
                "auc_max": float(np.max([c["auc"] for c in cells])),
                "auc_low_mean": float(np.mean([c["auc_low"] for c in cells])),
                "p_median": float(np.median([c["p_value"] for c in cells])),
            }
        rows.append(row)
    placebo = [p for r in runs for p in r["placebo"]]
    fits: dict[str, dict[str, float]] = {}
    for key in runs[0]["fit"]:
        fits[key] = {m: float(np.mean([r["fit"][key][m] for r in runs]))
                     for m in runs[0]["fit"][key]}
    audits = [c for r in runs for cond in ("with", "without") for c in r[cond].values()]
    return {
        "sizes": rows,
        "placebo": {**_rate([p["shown"] for p in placebo]),
                    "p_mean": float(np.mean([p["p_value"] for p in placebo])) if placebo
                    else float("nan")},
        "fit": fits,
        "train_seconds_per_seed": float(np.mean([r["train_seconds"] for r in runs])),
        "audit_seconds": float(np.median([c["seconds"] for c in audits + placebo])),
    }


def run_audit_benchmark(
    *,
    sizes: Sequence[int] = (10, 25, 50, 100),
    non_members: int = 200,
    digits_seeds: int = 16,
    digits_base: int = 300,
    digits_epochs: int = 150,
    text_seeds: int = 8,
    text_base: int = 150,
    text_epochs: int = 15,
    text_nested: bool = True,
    placebo_draws: int = 4,
    permutations: int = 9999,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Power, false-positive rate and placebo rate of the audit on both victims."""
    sizes = tuple(sorted(sizes))
    common = {"sizes": sizes, "non_members": non_members, "permutations": permutations,
              "placebo_draws": placebo_draws}
    start = time.perf_counter()
    digits = [_digits(base=digits_base, epochs=digits_epochs, seed=seed + s, **common)
              for s in range(digits_seeds)]
    digits_s = time.perf_counter() - start
    start = time.perf_counter()
    text = [_text(base=text_base, epochs=text_epochs, seed=seed + s, nested=text_nested,
                  **common) for s in range(text_seeds)]
    text_s = time.perf_counter() - start
    placebo = [p["shown"] for r in digits + text for p in r["placebo"]]
    return {
        "config": {
            "sizes": list(sizes), "non_members": non_members, "alpha": alpha,
            "permutations": permutations, "placebo_draws": placebo_draws,
            "placebo_suspects": PLACEBO_SUSPECTS, "seed": seed,
            "digits": {"seeds": digits_seeds, "base": digits_base, "epochs": digits_epochs,
                       "batch": DIGITS_BATCH, "lr": DIGITS_LR, "nested": False,
                       "model": "MLP 64-1024-10", "label_noise": 0.0},
            "text": {"seeds": text_seeds, "base": text_base, "epochs": text_epochs,
                     "batch": 32, "lr": TEXT_LR, "nested": text_nested,
                     "model": "CharGRU (embedding 48, GRU 256)",
                     "passages": text[0]["passages"] if text else None},
        },
        "digits": {"seconds": digits_s, **_summarise(digits, sizes), "runs": digits},
        "text": {"seconds": text_s, **_summarise(text, sizes), "runs": text},
        "placebo_pooled": _rate(placebo),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {"digits_seeds": 5, "text_seeds": 2, "placebo_draws": 2} if args.quick else {}
    print(json.dumps(run_audit_benchmark(**sizes), indent=1))


if __name__ == "__main__":
    main()
