"""Data integrity after training: was this data used to train this model?

A data owner who suspects their samples went into a model, an auditor checking that an
opt-out was honoured, a team verifying that an unlearned set no longer shows: each holds a
saved model, a set of *suspects*, and samples known to be outside training (*non-members*,
from the same distribution), sometimes a few known *members* too. :func:`audit` answers
three questions:

* **Is the suspect set, as a whole, more member-like than the non-members?** Every sample
  gets the model's membership signals (the probe's, in log space; higher = more
  member-like), standardised over all samples together without their roles and averaged
  into one score. The test statistic is the
  difference of the mean scores of suspects and non-members, and its p-value comes from
  permuting the roles (dataset inference, in the spirit of Maini et al. 2021): if the
  suspects were never trained on and come from the non-members' distribution, the two are
  exchangeable and the test is exact. A mean notices a few memorised suspects that a rank
  statistic (the AUC) would dilute. The effect size is the AUC of suspects against
  non-members on the same score, with a bootstrap interval.
* **Which suspects look trained on?** Each suspect's score and its p-value against the
  non-members' scores (conformal: the share of non-members scoring at least as high). With
  known members, the score is few-shot, as in the probe: nearest-centroid log-odds between
  the members and half of the non-members, calibrated on the other half.
* **How much does the model leak?** With at least 20 known members (and 20 non-members),
  the probe's Log-MIA on them with its chance level; and, when the members were chosen by
  independent fair coins (``random_inclusion=True``), the one-run audit's ε lower bound.

The test assumes that the non-members come from the same distribution as the suspects. If
they do not (another source, period or preprocessing), it measures the difference between
the two distributions, not membership: ``docs/science.md#data-integrity``.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(80, 8, generator=g), torch.randint(0, 3, (80,), generator=g)
    >>> model = torch.nn.Linear(8, 3)
    >>> result = audit(model, (x[:40], y[:40]), (x[40:], y[40:]), permutations=999)
    >>> result.verdict, result.suspects, result.non_members
    ('not shown', 40, 40)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fesmia_hooks._validation import choice, positive_int, probability
from fesmia_hooks.canaries import Canaries, CanarySet
from fesmia_hooks.epsilon import epsilon_lower_bound
from fesmia_hooks.exceptions import (
    CanaryError,
    ConfigurationError,
    FesmiaError,
    ProbeError,
    describe_error,
)
from fesmia_hooks.features import FeatureSpec, compute_features
from fesmia_hooks.readings import row_readings
from fesmia_hooks.report import LeakageReport

__all__ = ["AuditResult", "audit", "set_test", "sides_named"]

Kind = Literal["auto", "labelled", "sequences"]
#: Fewest known members (and non-members) for the Log-MIA reading: the probe's default
#: shots + queries per side.
LOG_MIA_MINIMUM = 20
#: Most random draws the permutation test makes (permutations times samples): about a
#: minute on one core. Beyond it the test refuses rather than run for hours.
MAX_PERMUTATION_WORK = 2 * 10**9


@dataclass(frozen=True)
class AuditResult:
    """What an audit found.

    Attributes:
        verdict: ``"shown"`` when the suspect set is significantly more member-like than the
            non-members (``p_value <= alpha``), else ``"not shown"``. "Not shown" is not
            proof of absence: see :attr:`effect_auc_low` and the sample-size table in
            ``docs/science.md#data-integrity``.
        p_value: One-sided permutation p-value of the set-level test.
        alpha: The test's level.
        effect_auc: AUC of suspects against non-members on the combined score (0.5: no
            difference; 1.0: every suspect above every non-member).
        effect_auc_low: Lower end of its 95 % bootstrap interval.
        effect_auc_high: Upper end.
        suspects: Number of suspects.
        non_members: Number of known non-members.
        members: Number of known members (0 when none were given).
        permutations: Permutations of the set-level test.
        signals: The signals averaged into the combined score.
        suspect_scores: ``[suspects]`` each suspect's score (higher = more member-like), in
            the order given: few-shot when members were given, else the combined score.
        suspect_p_values: ``[suspects]`` each suspect's p-value against the non-members.
        log_mia: The probe's report on the known members and non-members (``None`` with
            fewer than 20 of either).
        non_member_scores: ``[non_members]`` the non-members' scores of the set-level test.
        suspect_set_scores: ``[suspects]`` the suspects' scores of the set-level test (the
            same as ``suspect_scores`` without known members), comparable with
            ``non_member_scores``.
        epsilon_lower_bound: The one-run audit's ε lower bound on the known members and
            non-members, for members chosen by independent coins; NaN otherwise.
    """

    verdict: Literal["shown", "not shown"]
    p_value: float
    alpha: float
    effect_auc: float
    effect_auc_low: float
    effect_auc_high: float
    suspects: int
    non_members: int
    members: int
    permutations: int
    signals: tuple[str, ...]
    suspect_scores: np.ndarray = field(repr=False, compare=False)
    suspect_p_values: np.ndarray = field(repr=False, compare=False)
    log_mia: LeakageReport | None = field(default=None, repr=False, compare=False)
    epsilon_lower_bound: float = math.nan
    non_member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False)
    suspect_set_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False)

    @property
    def shown(self) -> bool:
        """Whether membership of the suspect set is shown."""
        return self.verdict == "shown"

    def ranking(self) -> np.ndarray:
        """Indices of the suspects, most member-like first."""
        return np.argsort(-self.suspect_scores, kind="stable")

    def summary(self) -> str:
        """A sentence a person can read.

        Example:
            >>> r = AuditResult("shown", 0.001, 0.05, 0.71, 0.62, 0.8, 50, 200, 0, 999,
            ...                 ("phi",), np.zeros(50), np.ones(50))
            >>> print(r.summary())
            shown: the 50 suspects are more member-like than the 200 known non-members (AUC 0.71 [0.62, 0.80], 0.5 = no difference; p = 0.001 <= 0.05, 999 permutations)
        """  # noqa: E501
        test = "<=" if self.p_value <= self.alpha else ">"
        head = (
            f"{self.verdict}: the {self.suspects} suspects are "
            + ("more member-like than" if self.shown else "not shown to differ from")
            + f" the {self.non_members} known non-members (AUC {self.effect_auc:.2f} "
            f"[{self.effect_auc_low:.2f}, {self.effect_auc_high:.2f}], 0.5 = no difference; "
            f"p = {self.p_value:.3g} {test} {self.alpha:g}, {self.permutations} permutations)"
        )
        if self.shown and self.effect_auc_low <= 0.5:
            head += ("; the AUC's interval reaches 0.5: the difference lies in a few suspects "
                     "that score high, while the typical suspect scores like a non-member")
        if self.log_mia is not None:
            r = self.log_mia
            head += (f"; on the {self.members} known members: Log-MIA strict {r.strict:.2f} "
                     f"(chance {r.chance_strict:.2f}), p = {r.p_value:.3g}")
        if math.isfinite(self.epsilon_lower_bound):
            head += f"; ε >= {self.epsilon_lower_bound:.2f} (95 %)"
        return head

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the verdict, the test, the effect and per-suspect scores."""
        out: dict[str, Any] = {
            "verdict": self.verdict, "p_value": self.p_value, "alpha": self.alpha,
            "effect_auc": self.effect_auc, "effect_auc_low": self.effect_auc_low,
            "effect_auc_high": self.effect_auc_high, "suspects": self.suspects,
            "non_members": self.non_members, "members": self.members,
            "permutations": self.permutations, "signals": list(self.signals),
            "suspect_scores": [float(v) for v in self.suspect_scores],
            "suspect_p_values": [float(v) for v in self.suspect_p_values],
            "suspect_set_scores": [float(v) for v in self.suspect_set_scores],
            "non_member_scores": [float(v) for v in self.non_member_scores],
            "ranking": [int(i) for i in self.ranking()],
            "epsilon_lower_bound": None if not math.isfinite(self.epsilon_lower_bound)
            else self.epsilon_lower_bound,
            "log_mia": None,
        }
        if self.log_mia is not None:
            r = self.log_mia
            out["log_mia"] = {"strict": r.strict, "chance_strict": r.chance_strict,
                              "relaxed": r.relaxed, "chance_relaxed": r.chance_relaxed,
                              "auc": r.auc, "p_value": r.p_value, "level": r.level.value}
        return out


def set_test(
    suspect_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    permutations: int = 9999,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """One-sided permutation test that suspects score higher than non-members.

    Returns ``(auc, p_value, auc_low, auc_high)``: the p-value
    ``(1 + #{permuted difference >= observed}) / (1 + permutations)`` of the difference of
    mean scores over random reassignments of the roles; the AUC of suspects against
    non-members (ties count one half) and its 95 % percentile bootstrap interval (each side
    resampled separately, 2,000 times).

    Example:
        >>> auc, p, lo, hi = set_test(np.arange(10.0, 20.0), np.arange(10.0), permutations=999)
        >>> auc, p
        (1.0, 0.001)
    """
    s = np.asarray(suspect_scores, dtype=np.float64)
    n = np.asarray(non_member_scores, dtype=np.float64)
    positive_int("permutations", permutations)
    both = np.concatenate([s, n])
    if permutations * len(both) > MAX_PERMUTATION_WORK:
        raise ConfigurationError(
            f"{permutations} permutations of {len(both):,} samples is "
            f"{permutations * len(both):.1e} draws, hours of work: lower `permutations` "
            f"(at most {MAX_PERMUTATION_WORK // len(both):,} here; 999 already tests at "
            "alpha = 0.05) or audit a random subset of the samples")
    rng = np.random.default_rng(seed)
    observed = s.mean() - n.mean()
    total = both.sum()
    above = 0
    rows = max(1, min(1000, 10**7 // len(both)))  # blocks of bounded memory
    for start in range(0, permutations, rows):
        size = min(rows, permutations - start)
        first = rng.random((size, len(both))).argsort(axis=1)[:, : len(s)]  # random subsets
        picked = both[first].sum(axis=1)
        diff = picked / len(s) - (total - picked) / len(n)
        above += int((diff >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    p_value = (1 + above) / (1 + permutations)
    low, high = np.quantile(_bootstrap_aucs(s, n, rng), [0.025, 0.975])
    return round(_auc(s, n), 12), p_value, float(low), float(high)


def _bootstrap_aucs(s: np.ndarray, n: np.ndarray, rng: np.random.Generator,
                    resamples: int = 2000) -> np.ndarray:
    """AUCs of ``resamples`` bootstrap resamples (each side resampled on its own).

    A resample's AUC is ``w_s . K . w_n / (n_s n_n)`` with ``K[i, j]`` = 1, 1/2 or 0 as
    suspect ``i`` scores above, level with or below non-member ``j`` and ``w`` the resample's
    counts of each sample: one matrix product for all resamples, in blocks of bounded size.
    """
    out = np.empty(resamples)
    if len(s) * len(n) > 2**22:  # too many pairs to hold: the normal interval instead
        return _hanley_mcneil(_auc(s, n), len(s), len(n), rng, resamples)
    pair = (s[:, None] > n[None, :]) + 0.5 * (s[:, None] == n[None, :])
    block = max(1, min(resamples, 2**22 // max(len(s) + len(n), 1)))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        w_s, w_n = _counts(rng, len(s), size), _counts(rng, len(n), size)
        out[start:start + size] = ((w_s @ pair) * w_n).sum(axis=1) / (len(s) * len(n))
    return out


def _hanley_mcneil(auc: float, n_s: int, n_n: int, rng: np.random.Generator,
                   draws: int) -> np.ndarray:
    """Draws from the AUC's normal approximation (Hanley and McNeil, 1982), for large sets.

    With millions of pairs the bootstrap's resamples cost minutes and the normal
    approximation of the AUC's sampling distribution is accurate.
    """
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_s - 1) * (q1 - auc * auc) + (n_n - 1) * (q2 - auc * auc)) / (
        n_s * n_n)
    return np.clip(rng.normal(auc, math.sqrt(max(var, 0.0)), draws), 0.0, 1.0)


def _counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``[rows, n]``: how often each of ``n`` samples is drawn in each of ``rows`` resamples."""
    draws = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n)


def _auc(first: np.ndarray, second: np.ndarray) -> float:
    """AUC of ``first`` against ``second``, ties one half (the probe's reading of a ranking)."""
    scores = torch.from_numpy(np.concatenate([first, second]))[None]
    _, _, auc = row_readings(scores, torch.arange(scores.shape[1]) < len(first), 0)
    return float(auc[0])


def _kind_of(side: Any) -> Literal["labelled", "sequences"]:
    if isinstance(side, Dataset):
        return "labelled"
    if isinstance(side, Mapping):
        return "sequences"
    if isinstance(side, (tuple, list)) and len(side) == 2 and all(
            hasattr(part, "shape") for part in side):
        return "labelled"
    if hasattr(side, "dtype") and hasattr(side, "shape") and len(side.shape) == 2 and (
            not torch.is_floating_point(torch.as_tensor(side[:1]))):
        return "sequences"
    if isinstance(side, (list, tuple)) and side and isinstance(side[0], (list, tuple)):
        return "sequences"
    raise ConfigurationError(
        "could not tell what kind of data this is: give classifier samples as a pair "
        "(inputs, labels) or a Dataset, token sequences as an integer [n, T] tensor, a list "
        f"of token lists or a tokenizer's output, or pass kind=...; got {type(side).__name__}"
    )


def _pool(kind: str, first: Any, second: Any, *, first_name: str = "members",
          **options: Any) -> Canaries:
    """The two sides as one canary pool (the checks of the canary sets apply).

    The canary sets' messages name their sides "members" and "non_members"; they are told
    here of ``first_name`` and "non-members".
    """
    try:
        if kind == "labelled":
            return CanarySet(members=first, non_members=second,
                             num_classes=options.get("num_classes"))
        from fesmia_hooks.sequences import SequenceCanarySet

        return SequenceCanarySet(first, second, pad_token_id=options.get("pad_token_id"),
                                 vocab_size=options.get("vocab_size"),
                                 decode=options.get("decode"))
    except CanaryError as exc:
        raise CanaryError(sides_named(str(exc), first_name)) from None


def sides_named(message: str, first_name: str = "suspects") -> str:
    """A canary set's message about (members, non_members) told of the audit's sides.

    Example:
        >>> sides_named("2 sample(s) appear among both members and non_members")
        '2 sample(s) appear among both suspects and non-members'
    """
    message = re.sub(r"(?<![\w-])members\b", first_name, message)
    return re.sub(r"\bnon_members\b", "non-members", message)


def _signals(model: nn.Module, pool: Canaries, batch_size: int) -> tuple[np.ndarray, tuple]:
    """``[n, F]`` raw signals of the pool (first side first) and their names.

    A model that fails on the samples raises a :class:`~fesmia_hooks.ProbeError` naming the
    failure's kind and words (never the samples).
    """
    if pool.kind == "sequences":
        from fesmia_hooks.text import DEFAULT_SEQUENCE_SIGNALS, SequenceSignals

        names: tuple[str, ...] = DEFAULT_SEQUENCE_SIGNALS
        spec = FeatureSpec(signal_fn=SequenceSignals(names), batch_size=batch_size)
    else:
        from fesmia_hooks.signals import DEFAULT_SIGNALS

        names = tuple(DEFAULT_SIGNALS)
        spec = FeatureSpec(signals=names, batch_size=batch_size)
    try:
        features = compute_features(model, pool, spec)
    except FesmiaError:
        raise
    except Exception as exc:  # the model's own failure, told in the library's terms
        raise ProbeError(f"the model failed on the samples ({describe_error(exc)})") from exc
    assert features.signals is not None
    return features.signals.detach().to("cpu", torch.float64).numpy(), names


def _standardised(rows: np.ndarray) -> np.ndarray:
    """Each column centred and scaled over every row (roles unseen); constant columns 0."""
    spread = rows.std(axis=0)
    return (rows - rows.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def _combined(signals: np.ndarray) -> np.ndarray:
    """Signals standardised over every row (roles unseen), averaged: one score per row."""
    return _standardised(signals).mean(axis=1)


def _conformal(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each score's p-value against ``reference``: ``(1 + #{ref >= s}) / (1 + len(ref))``."""
    ref = np.sort(reference)
    at_least = len(ref) - np.searchsorted(ref, scores, side="left")
    return (1 + at_least) / (1 + len(ref))


def _check_size(suspects: int, non_members: int, alpha: float) -> None:
    # the smallest p-value a permutation test can give is 1 / C(n, n_s); the guard keeps
    # the binomial coefficient small (and exact: ints compare with floats without rounding)
    if min(suspects, non_members) < 64 and math.comb(suspects + non_members,
                                                     suspects) < 1 / alpha:
        raise CanaryError(
            f"with {suspects} suspect(s) and {non_members} non-member(s) no test can reach "
            f"p <= {alpha:g} (there are only {math.comb(suspects + non_members, suspects)} "
            "ways to split them): give more samples (docs/science.md#data-integrity has "
            "the sizes that give a useful test)"
        )


def audit(
    model: nn.Module,
    suspects: Any,
    non_members: Any,
    *,
    members: Any = None,
    kind: Kind = "auto",
    alpha: float = 0.05,
    permutations: int = 9999,
    seed: int = 0,
    random_inclusion: bool = False,
    batch_size: int = 256,
    num_classes: int | None = None,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
    decode: Callable[[list[int]], str | bytes] | None = None,
) -> AuditResult:
    """Test whether ``suspects`` were used to train ``model``, against known non-members.

    Side-effect free: the model is read on its own device under the probe's guard
    (weights, buffers, modes, random streams and gradients as they were).

    Args:
        model: A classifier returning logits, or a causal language model returning ``[B, T,
            V]`` logits (or an output with ``.logits``).
        suspects: The samples in question: a pair ``(inputs, labels)`` or a ``Dataset`` for
            a classifier; token sequences (an integer ``[n, T]`` tensor, a list of token
            lists, or a tokenizer's output) for a language model.
        non_members: Samples known never to have been trained on, *from the suspects'
            distribution*, in the same form.
        members: Optional samples known to have been trained on, in the same form: they
            make the per-suspect scores few-shot and give the Log-MIA reading.
        kind: ``"labelled"``, ``"sequences"`` or ``"auto"`` (told from the data's form).
        alpha: Level of the set-level test.
        permutations: Permutations of the set-level test.
        seed: Seed of the permutations, the bootstrap and the split of the non-members.
        random_inclusion: The known members and non-members were chosen by independent fair
            coins (as :meth:`~fesmia_hooks.CanarySet.for_audit` does): report the one-run
            audit's ε lower bound on them.
        batch_size: Samples per forward pass.
        num_classes: Checks labels lie in ``[0, num_classes)``.
        pad_token_id: Padding id of token sequences.
        vocab_size: Checks token ids lie in ``[0, vocab_size)``.
        decode: ``decode(token_ids) -> str`` (a tokenizer's), for the zlib signal of token
            sequences: it compresses the text rather than the ids.

    Returns:
        The :class:`AuditResult`.

    Raises:
        CanaryError: On samples the canary sets refuse (shapes, dtypes, labels, a sample on
            both sides), or too few samples for the test to reach ``alpha``.
        ConfigurationError: On bad options.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    kind = choice("kind", kind, ("auto", "labelled", "sequences"))  # type: ignore[assignment]
    alpha = probability("alpha", alpha)
    positive_int("permutations", permutations)
    positive_int("seed", seed, minimum=0)
    positive_int("batch_size", batch_size)
    if not isinstance(random_inclusion, bool):
        raise ConfigurationError(
            f"`random_inclusion` must be True or False, got {type(random_inclusion).__name__}")
    resolved = _kind_of(suspects) if kind == "auto" else kind
    if random_inclusion and members is None:
        raise ConfigurationError(
            "random_inclusion=True describes the known members, but no `members` were given")
    if decode is not None and not callable(decode):
        raise ConfigurationError(f"`decode` must be callable, got {type(decode).__name__}")
    options = {"num_classes": num_classes, "pad_token_id": pad_token_id,
               "vocab_size": vocab_size, "decode": decode}
    pool = _pool(resolved, suspects, non_members, first_name="suspects", **options)
    n_s, n_n = pool.num_members, pool.num_non_members
    _check_size(n_s, n_n, alpha)
    if members is not None and n_n < 2:
        raise CanaryError(
            f"with known members the per-suspect scores need at least 2 non-members (one "
            f"half to fit, one to calibrate), got {n_n}")
    raw, names = _signals(model, pool, batch_size)
    member_raw = np.empty((0, raw.shape[1]))
    known = None
    if members is not None:
        known = _pool(resolved, members, non_members, **options)  # members vs non-members
        member_raw = _signals(model, known, batch_size)[0][: known.num_members]
    rows = np.concatenate([raw, member_raw])
    score = _combined(rows)
    s_score, n_score = score[:n_s], score[n_s:n_s + n_n]
    auc, p_value, low, high = set_test(s_score, n_score, permutations=permutations, seed=seed)
    per_suspect, p_each = s_score, _conformal(s_score, n_score)
    if len(member_raw):
        per_suspect, p_each = _few_shot(rows, n_s, n_n, len(member_raw), seed)
    log_mia, epsilon = None, math.nan
    if known is not None:
        if min(known.num_members, known.num_non_members) >= LOG_MIA_MINIMUM:
            from fesmia_hooks.probe import FeSMIA

            log_mia = FeSMIA(seed=seed).evaluate(model, known, alpha=alpha)
        if random_inclusion:
            m_score = score[n_s + n_n:]
            epsilon = epsilon_lower_bound(
                np.concatenate([m_score, n_score]),
                np.arange(len(m_score) + n_n) < len(m_score), seed=seed).epsilon
    return AuditResult(
        verdict="shown" if p_value <= alpha else "not shown", p_value=p_value, alpha=alpha,
        effect_auc=auc, effect_auc_low=low, effect_auc_high=high, suspects=n_s,
        non_members=n_n, members=len(member_raw), permutations=permutations,
        signals=names, suspect_scores=per_suspect, suspect_p_values=p_each,
        log_mia=log_mia, epsilon_lower_bound=epsilon, non_member_scores=n_score,
        suspect_set_scores=s_score,
    )


def _few_shot(rows: np.ndarray, n_s: int, n_n: int, n_m: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Suspects' nearest-centroid log-odds, calibrated on held-out non-members.

    The centroids are those of the members and of half the non-members; the other half
    calibrates.
    """
    z = _standardised(rows)
    suspects, non_members, members = z[:n_s], z[n_s:n_s + n_n], z[n_s + n_n:]
    order = np.random.default_rng(seed).permutation(n_n)
    support, held = non_members[order[: n_n // 2]], non_members[order[n_n // 2:]]
    c_m, c_n = members.mean(axis=0), support.mean(axis=0)

    def log_odds(q: np.ndarray) -> np.ndarray:
        return ((q - c_n) ** 2).sum(axis=1) - ((q - c_m) ** 2).sum(axis=1)

    scores = log_odds(suspects)
    return scores, _conformal(scores, log_odds(held))

