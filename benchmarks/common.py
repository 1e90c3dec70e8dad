"""Shared pieces of the benchmarks: machine facts, workloads, training, reference attacks.

Nothing here is part of the library. The reference attacks (the population-level threshold
attack, TensorFlow Privacy's per-epoch full-set attack, LiRA) live in the benchmarks on
purpose: they are what the probe is measured against.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.canaries import wrong_labels as canary_wrong_labels
from fesmia_hooks.demos.digits import digits_arrays, digits_mlp, load_noisy_digits
from fesmia_hooks.logmia import batched_tp_counts, chance_counts
from fesmia_hooks.report import share_beyond_chance

NUM_CLASSES = 10
#: Share beyond chance (strict) where the default budget's "low" ceiling is crossed
#: (``LevelBands().moderate``): the population attack is read on the probe's own scale.
BUDGET_SHARE = fh.LevelBands().moderate


# --------------------------------------------------------------------------- machine & timing
def machine() -> dict[str, Any]:
    """The facts a reader needs to weigh a timing: platform, torch, threads, load."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = []
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "fesmia_hooks": fh.__version__,
        "load_average_at_start": load,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh_:
            for line in fh_:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


# --------------------------------------------------------------------------- statistics
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho; NaN when either side is constant or there are fewer than 3 points."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


# --------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """One victim's data: what it trains on, its canaries, and every non-member we hold.

    ``train`` holds every member (the canary members included); ``non_members`` holds every
    sample never trained on (the canary non-members included), with the same label noise.
    """

    name: str
    kind: str
    train: tuple[torch.Tensor, torch.Tensor]
    canaries: fh.CanarySet
    non_members: tuple[torch.Tensor, torch.Tensor]
    embedding_layer: str
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def make_model(self) -> nn.Module:
        if self.kind == "digits":
            return digits_model(self.dropout)
        return small_cnn(self.dropout)


def digits_model(dropout: float = 0.0) -> nn.Module:
    """The reference MLP 64-1024-10 (``digits_mlp``), with optional dropout after the ReLU."""
    if dropout <= 0:
        return digits_mlp()
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Dropout(dropout), nn.Linear(1024, 10))


def small_cnn(dropout: float = 0.0) -> nn.Module:
    """A small CNN for 3x32x32 inputs: two conv blocks with BatchNorm, a 128-unit head."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(),
    ]  # fmt: skip
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(128, 10))
    return nn.Sequential(*layers)


def wide_cnn() -> nn.Module:
    """A VGG-style CNN for 3x32x32 inputs (about 0.23 GFLOP per image, like a CIFAR ResNet)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 256), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256 * 4 * 4, 10),
    )  # fmt: skip


CNN_EMBEDDING = "10"  # the ReLU after Linear(2048, 128)
DIGITS_EMBEDDING = "1"  # the ReLU after Linear(64, 1024)


def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_arrays("the benchmarks")


def _flip(y: torch.Tensor, rate: float, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(y), generator=g) < rate
    return torch.where(flip, torch.randint(0, NUM_CLASSES, (len(y),), generator=g), y)


def wrong_labels(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A label that is certainly wrong for every sample (crafted canaries)."""
    return canary_wrong_labels(y, NUM_CLASSES, g)


def digits_workload(
    *,
    label_noise: float,
    seed: int,
    members: int = 300,
    canaries: int = 64,
    dropout: float = 0.0,
    crafted: int = 0,
    name: str = "digits",
) -> Workload:
    """The demo's digits split (``load_noisy_digits``), plus every other digit as a non-member.

    The members and canaries are exactly those of ``load_noisy_digits(members, canaries,
    label_noise, seed)``; the remaining images get label noise at the same rate (their own
    generator) and join the canary non-members as the population's non-members.

    With ``crafted > 0``, ``crafted`` + ``crafted`` of the remaining images get a certainly
    wrong label; the first half joins the training set (crafted canary members), the second
    is held out (crafted non-members). ``extra["crafted"]`` holds their CanarySet, and
    ``extra["held_out_true_labels"]`` the other held-out images with their true labels.
    """
    task = load_noisy_digits(
        members=members, canaries=canaries, label_noise=label_noise, seed=seed
    )
    x, y = _digits_arrays()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    rest = order[members + canaries :]
    g = torch.Generator().manual_seed(seed + 7919)
    rest_x, rest_y, rest_true = x[rest], _flip(y[rest], label_noise, g), y[rest]
    c = task.canaries
    assert c.labels is not None
    nm = c.num_members
    train_x, train_y = task.train
    extra: dict[str, Any] = {}
    if crafted:
        cx, cy = rest_x[: 2 * crafted], wrong_labels(rest_true[: 2 * crafted], g)
        crafted_set = fh.CanarySet(
            members=(cx[:crafted], cy[:crafted]),
            non_members=(cx[crafted:], cy[crafted:]),
            num_classes=NUM_CLASSES,
        )
        extra["crafted"] = crafted_set
        train_x = torch.cat([train_x, cx[:crafted]])
        train_y = torch.cat([train_y, cy[:crafted]])
        rest_x, rest_y = rest_x[2 * crafted :], rest_y[2 * crafted :]
        rest_true = rest_true[2 * crafted :]
    extra["held_out_true_labels"] = (rest_x, rest_true)
    return Workload(
        name=name,
        kind="digits",
        train=(train_x, train_y),
        canaries=c,
        non_members=(torch.cat([c.inputs[nm:], rest_x]), torch.cat([c.labels[nm:], rest_y])),
        embedding_layer=DIGITS_EMBEDDING,
        dropout=dropout,
        extra=extra,
    )


class TinyGPT(nn.Module):
    """A GPT-2-shaped causal language model, small in depth and width: GPT-2's vocabulary
    (50,257 tokens), so the logits per sequence, and the probe's forward pass, are GPT-2's;
    2 pre-norm blocks of width 128 with 4 heads."""

    def __init__(self, vocab: int = 50257, width: int = 128, layers: int = 2,
                 context: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(t, device=ids.device))
        causal = torch.triu(torch.full((t, t), float("-inf"), device=ids.device), 1)
        return self.head(self.norm(self.blocks(h, mask=causal, is_causal=True)))


def make_images(
    n: int, *, seed: int, label_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` image-shaped samples ``[n, 3, 32, 32]`` with labels, made in code.

    Each is one of scikit-learn's 1,797 digits, upsampled 3x to 24x24, placed at a random
    offset on a 32x32 canvas, painted with a random foreground and background colour, with
    Gaussian pixel noise (sd 0.15); a share ``label_noise`` of labels is replaced at random.
    """
    x, y, g = _images(n, seed)
    return x, _flip(y, label_noise, g)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    x8, y8 = _digits_arrays()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x8), (n,), generator=g)
    glyph = x8[idx].reshape(n, 8, 8).repeat_interleave(3, 1).repeat_interleave(3, 2)
    offsets = torch.randint(0, 9, (n, 2), generator=g)
    canvas = torch.zeros(n, 32, 32)
    for i in range(n):
        r, c = int(offsets[i, 0]), int(offsets[i, 1])
        canvas[i, r : r + 24, c : c + 24] = glyph[i]
    fg = 0.5 + 0.5 * torch.rand(n, 3, generator=g)
    bg = 0.5 * torch.rand(n, 3, generator=g)
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * canvas[:, None]
    img = img + 0.15 * torch.randn(img.shape, generator=g)
    return img.float().contiguous(), y8[idx], g


def cnn_workload(
    *,
    members: int,
    non_members: int,
    seed: int,
    label_noise: float = 0.2,
    canaries: int = 64,
    dropout: float = 0.0,
    crafted: int = 0,
    name: str = "cnn",
) -> Workload:
    """``members`` generated images to train on (``canaries`` of them are canary members) and
    ``non_members`` never trained on (``canaries`` of them are canary non-members).

    With ``crafted > 0``, ``2 * crafted`` more images get a certainly wrong label; the first
    half joins the training set, the second is held out (``extra["crafted"]``).
    """
    x, y_clean, g = _images(members + non_members + 2 * crafted, seed)
    y = _flip(y_clean, label_noise, g)
    canary_set = fh.CanarySet(
        members=(x[:canaries], y[:canaries]),
        non_members=(x[members : members + canaries], y[members : members + canaries]),
        num_classes=NUM_CLASSES,
    )
    train_x, train_y = x[:members], y[:members]
    extra: dict[str, Any] = {}
    if crafted:
        start = members + non_members
        cx, cy = x[start:], wrong_labels(y_clean[start:], g)
        extra["crafted"] = fh.CanarySet(
            members=(cx[:crafted], cy[:crafted]),
            non_members=(cx[crafted:], cy[crafted:]),
            num_classes=NUM_CLASSES,
        )
        train_x, train_y = torch.cat([train_x, cx[:crafted]]), torch.cat([train_y, cy[:crafted]])
    end = members + non_members
    return Workload(
        name=name,
        kind="cnn",
        train=(train_x, train_y),
        canaries=canary_set,
        non_members=(x[members:end], y[members:end]),
        embedding_layer=CNN_EMBEDDING,
        dropout=dropout,
        extra=extra,
    )


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Recipe:
    """How a victim is trained (Adam, shuffled mini-batches)."""

    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0


EpochHook = Callable[[nn.Module, int], bool | None]


def train(
    make_model: Callable[[], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    *,
    seed: int,
    on_epoch: EpochHook | None = None,
) -> nn.Module:
    """Train a fresh model; ``on_epoch(model, epoch)`` after each epoch may return True to stop.

    The seed fixes the initialisation and every batch order, so two calls with the same seed
    train bit-identical models (when the hook leaves training alone).
    """
    torch.manual_seed(seed)
    model = make_model()
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if on_epoch is not None and on_epoch(model, epoch):
            break
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- attacks
def signal(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str = "phi", batch: int = 512
) -> np.ndarray:
    """One per-sample signal (float64), computed side-effect free in eval mode."""
    parts = []
    with fh.untouched(model):
        for i in range(0, len(x), batch):
            logits = fh.extract_logits(model(x[i : i + batch]))
            parts.append(fh.classification_signals(logits, y[i : i + batch], [name])[:, 0])
    return torch.cat(parts).double().numpy()


def tpr_at(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """Largest TPR of a threshold on the scores at false-positive rate <= ``fpr``."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    f, t, _ = roc_curve(labels, np.r_[members, non_members], drop_intermediate=False)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return float(roc_auc_score(labels, np.r_[members, non_members]))


_EPISODES: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def expected_readings(
    members: np.ndarray,
    non_members: np.ndarray,
    *,
    queries: int = 15,
    episodes: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The threshold attack read on the probe's scale, over random query sets.

    Each episode draws ``queries`` members and ``queries`` non-members from the whole
    population (the same draws at every check: common random numbers). Returns the mean
    strict and relaxed Log-MIA, the mean members named with no false accusation, and its
    share beyond chance: what the probe's level reads, for the population attack.
    """
    m = torch.as_tensor(members, dtype=torch.float64)
    nm = torch.as_tensor(non_members, dtype=torch.float64)
    key = (len(m), len(nm), queries, episodes, seed)
    if key not in _EPISODES:
        g = torch.Generator().manual_seed(seed)
        _EPISODES[key] = (
            torch.rand(episodes, len(m), generator=g).argsort(1)[:, :queries],
            torch.rand(episodes, len(nm), generator=g).argsort(1)[:, :queries],
        )
    mi, ni = _EPISODES[key]
    scores = torch.cat([m[mi], nm[ni]], dim=1)
    is_member = torch.zeros(2 * queries, dtype=torch.bool)
    is_member[:queries] = True
    tp0, tpk = batched_tp_counts(scores, is_member)
    denom = math.log(queries + 1)
    named = float(tp0.double().mean())
    return {
        # as batched_log_mia reads them (float32), from the counts computed once
        "strict": float((torch.log1p(tp0.to(torch.float32)) / denom).mean()),
        "relaxed": float((torch.log1p(tpk.to(torch.float32)) / denom).mean()),
        "named": named,
        "share": share_beyond_chance(named, chance_counts(queries)[0], queries),
    }


def population_attack(
    model: nn.Module, work: Workload, *, seed: int = 0, episodes: int = 2000
) -> dict[str, float]:
    """Threshold attack on the logit-scaled confidence over all members and all non-members."""
    from scipy.stats import mannwhitneyu

    m = signal(model, *work.train)
    nm = signal(model, *work.non_members)
    read = expected_readings(m, nm, seed=seed, episodes=episodes)
    strict, relaxed, named, share = read["strict"], read["relaxed"], read["named"], read["share"]
    return {
        "auc": auc(m, nm),
        "tpr_at_1pct_fpr": tpr_at(m, nm, 0.01),
        "strict": strict,
        "relaxed": relaxed,
        "members_named": named,
        "share": share,
        "p_value": float(mannwhitneyu(m, nm, alternative="greater").pvalue),
    }


def crosses_budget(pop: dict[str, float], *, looks: int) -> bool:
    """The population attack crosses the default budget (``LeakageBudget()``, which
    tolerates no significant leakage): its AUC is above 0.5 at level 0.05 / ``looks``."""
    return pop["p_value"] <= 0.05 / max(looks, 1)


def reaches_band(pop: dict[str, float], *, looks: int) -> bool:
    """The population attack leaks beyond the ``moderate`` band: significant, and its share
    beyond chance (mean members named with no false accusation on random 15 + 15 query
    sets) at least 0.1. What makes a panel run *leaky* for the tracking target."""
    return crosses_budget(pop, looks=looks) and pop["share"] >= BUDGET_SHARE


def tfp_reference_check(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    batch: int = 512,
) -> dict[str, float]:
    """TensorFlow Privacy's per-epoch callback, re-done: a threshold attack on the loss of
    the *entire* training and test sets (AUC, attacker advantage, PPV at the best point)."""
    from sklearn.metrics import roc_curve

    def losses(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        out = []
        with fh.untouched(model):
            for i in range(0, len(x), batch):
                logits = fh.extract_logits(model(x[i : i + batch]))
                out.append(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="none"))
        return torch.cat(out).double().numpy()

    lt, lv = losses(*train), losses(*test)
    labels = np.r_[np.ones(len(lt)), np.zeros(len(lv))]
    f, t, _ = roc_curve(labels, -np.r_[lt, lv])
    best = int(np.argmax(t - f))
    tp, fp = t[best] * len(lt), f[best] * len(lv)
    return {
        "auc": float(np.trapezoid(t, f)) if hasattr(np, "trapezoid") else float(np.trapz(t, f)),
        "advantage": float(np.max(np.abs(t - f))),
        "ppv": float(tp / (tp + fp)) if tp + fp > 0 else 0.0,
    }


def lira(
    work: Workload,
    target: nn.Module,
    recipe: Recipe,
    *,
    shadows: int,
    seed: int,
    pool_non_members: int | None = None,
) -> dict[str, Any]:
    """Online LiRA (Carlini et al. 2022) with ``shadows`` shadow models, global variance.

    The pool is every member of the target plus as many non-members. Each pool sample is in
    the training set of exactly half the shadows (balanced as in the authors' code); the
    shadows are trained with the target's recipe. The score of a sample is the likelihood
    ratio of the target's logit-scaled confidence under the Gaussians of its IN and OUT
    shadow confidences, with one variance per side shared by all samples.
    """
    from scipy.stats import norm

    tx, ty = work.train
    k = len(tx) if pool_non_members is None else pool_non_members
    nx, ny = work.non_members[0][:k], work.non_members[1][:k]
    px, py = torch.cat([tx, nx]), torch.cat([ty, ny])
    is_member = np.r_[np.ones(len(tx), bool), np.zeros(len(nx), bool)]
    rng = np.random.default_rng(seed)
    keep = rng.uniform(size=(shadows, len(px))).argsort(0) < shadows // 2
    phis = np.empty((shadows, len(px)))
    start = time.perf_counter()
    for s in range(shadows):
        idx = torch.as_tensor(np.flatnonzero(keep[s]))
        shadow = train(work.make_model, (px[idx], py[idx]), recipe, seed=seed * 1000 + 17 + s)
        phis[s] = signal(shadow, px, py)
    seconds = time.perf_counter() - start
    observed = signal(target, px, py)
    inside = np.where(keep, phis, np.nan)
    outside = np.where(~keep, phis, np.nan)
    mu_in, mu_out = np.nanmean(inside, 0), np.nanmean(outside, 0)
    sd_in = float(np.nanstd(inside - mu_in)) + 1e-6
    sd_out = float(np.nanstd(outside - mu_out)) + 1e-6
    score = norm.logpdf(observed, mu_in, sd_in) - norm.logpdf(observed, mu_out, sd_out)
    m, nm = score[is_member], score[~is_member]
    return {
        "shadows": shadows,
        "pool": len(px),
        "tpr_at_1pct_fpr": tpr_at(m, nm, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at(m, nm, 0.001),
        "auc": auc(m, nm),
        "threshold_auc": auc(observed[is_member], observed[~is_member]),
        "threshold_tpr_at_1pct_fpr": tpr_at(observed[is_member], observed[~is_member], 0.01),
        "seconds_shadows": seconds,
    }
