"""An empirical lower bound on a training run's differential-privacy ε, from its canaries.

The one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023): each of ``m`` canaries is
put into the training set by an independent fair coin; after training, an attacker that
sees only the model guesses "member" on the ``k`` canaries it is surest of, "non-member"
on the ``k`` it is least sure of, and abstains on the rest. If training is
(ε, δ)-differentially private, the number of correct guesses among the ``r = 2k`` is at
most a Binomial(r, e^ε / (1 + e^ε)) count, up to a δ term; a count too high for that
(p-value below ``1 - confidence``) disproves ε. The largest ε disproved is the bound.

Three rules keep the bound valid, and this module keeps them:

* **The guesses see the model, never the coins.** They come from a label-free score of
  each canary (a signal of the model's output on it). FeS-MIA's few-shot scores are *not*
  used: they are fitted on other canaries' membership, and a guess that reads other coins
  can be right more often than any ε-DP mechanism allows (``docs/science.md#dp-audit``).
* **Ties are broken by a random order drawn independently of the coins**, never by the
  canaries' order (members come first in a :class:`~fesmia_hooks.CanarySet`: an untrained
  model with constant scores would otherwise "name" every member).
* **k is not chosen by peeking.** The bound is computed at each ``k`` of a fixed grid
  (:func:`guess_counts`) at confidence ``1 - (1 - confidence) / len(grid)`` each
  (Bonferroni), and the largest is reported: the family still holds at ``confidence``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> member = rng.random(1000) < 0.5
    >>> scores = np.where(member, 1.0, -1.0)  # an attacker that is always right
    >>> round(epsilon_lower_bound(scores, member).epsilon, 2)
    4.68
    >>> epsilon_lower_bound(rng.random(1000), member).epsilon  # a model that reveals nothing
    0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fesmia_hooks._validation import positive_int, probability
from fesmia_hooks.exceptions import ConfigurationError

__all__ = [
    "EpsilonBound",
    "audit_p_value",
    "best_attainable_epsilon",
    "epsilon_from_guesses",
    "epsilon_lower_bound",
    "guess_counts",
]

#: Shares of the scored canaries guessed on each side at each point of the grid.
GUESS_SHARES: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
_BISECTIONS = 48


@dataclass(frozen=True)
class EpsilonBound:
    """An ε lower bound and how it was reached.

    Attributes:
        epsilon: The bound (0.0 when nothing can be claimed).
        confidence: Probability that the bound holds, over the canaries' coins.
        delta: The δ of the (ε, δ) guarantee it disproves.
        canaries: Randomised canaries (``m``).
        guesses: Guesses made at the grid point that gave the bound (``2k``).
        correct: Correct guesses among them.
    """

    epsilon: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int


def _log_choose(r: int) -> np.ndarray:
    """``[r + 1]``: ``log C(r, j)`` for ``j = 0..r``."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, r + 1, dtype=np.float64)))])
    return log_fact[r] - log_fact - log_fact[::-1]


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float,
                  delta: float) -> float:
    """Probability of ``correct`` or more right guesses if training were (ε, δ)-DP.

    An upper bound on it, exact for δ = 0: the upper tail of Binomial(``guesses``, q) at
    ``correct``, q = e^ε / (1 + e^ε) (ε-DP randomised response), plus
    ``2 * canaries * delta`` times the largest average of the binomial's probabilities just
    below ``correct`` (the δ term of the one-run audit's theorem).

    Args:
        canaries: Randomised canaries, ``m``.
        guesses: Guesses made, ``r <= m``.
        correct: Right guesses, ``v <= r``.
        epsilon: The ε under test (>= 0).
        delta: The δ under test, in ``[0, 1]``.

    Example:
        >>> round(audit_p_value(100, 10, 10, 0.0, 0.0), 6)  # 10 of 10 by coin flips
        0.000977
    """
    m, r, v = int(canaries), int(guesses), int(correct)
    if not (math.isfinite(epsilon) and epsilon >= 0) or not 0 <= delta <= 1:
        raise ConfigurationError(
            f"need a finite epsilon >= 0 and delta in [0, 1], got {epsilon!r} and {delta!r}")
    if not 0 <= v <= r <= m:
        raise ConfigurationError(
            f"need 0 <= correct <= guesses <= canaries, got {v}, {r} and {m}"
        )
    log_q = -math.log1p(math.exp(-epsilon))  # log of e^ε / (1 + e^ε)
    log_1q = -epsilon + log_q  # log of 1 / (1 + e^ε)
    j = np.arange(r + 1)
    pmf = np.exp(_log_choose(r) + j * log_q + (r - j) * log_1q)
    tail = float(pmf[v:].sum())
    if delta > 0 and v > 0:
        # sums of the v - i .. v - 1 probabilities, i = 1..v, divided by i
        below = np.cumsum(pmf[:v][::-1]) / np.arange(1, v + 1)
        tail += 2 * m * delta * float(below.max())
    return min(tail, 1.0)


def epsilon_from_guesses(
    canaries: int,
    guesses: int,
    correct: int,
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> float:
    """The largest ε that ``correct`` right guesses of ``guesses`` disprove (0.0 if none).

    Example:
        >>> round(epsilon_from_guesses(1000, 200, 200, delta=0.0), 3)
        4.194
        >>> epsilon_from_guesses(1000, 200, 100)
        0.0
    """
    level = 1.0 - probability("confidence", confidence)
    if audit_p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
        if high > 1e3:  # every guess right and δ = 0: no finite ε explains it
            return math.inf
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if audit_p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def guess_counts(scored: int) -> list[int]:
    """The fixed grid of guesses per side for ``scored`` canaries with a score.

    ``k`` runs over the shares :data:`GUESS_SHARES` of the scored canaries (at least one,
    at most half of them), each ``k`` once.

    Example:
        >>> guess_counts(256)
        [16, 32, 64, 128]
        >>> guess_counts(3)
        [1]
    """
    if scored < 2:
        return []
    return sorted({min(scored // 2, max(1, round(scored * s))) for s in GUESS_SHARES})


def epsilon_lower_bound(
    scores: np.ndarray,
    is_member: np.ndarray,
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
) -> EpsilonBound:
    """The one-run audit's ε lower bound from label-free canary scores.

    Valid only when each canary was included by an independent fair coin (build such a set
    with :meth:`~fesmia_hooks.CanarySet.for_audit`) and ``scores`` were computed without
    the coins (higher = more member-like). Canaries whose score is not finite abstain.

    Args:
        scores: ``[m]`` scores, one per randomised canary.
        is_member: ``[m]`` the coins: whether each canary was trained on.
        delta: δ of the guarantee tested.
        confidence: Probability that the bound holds.
        seed: Seed of the random order that breaks ties (drawn without the coins).

    Returns:
        The :class:`EpsilonBound` at the grid point that gives the largest bound.

    Example:
        >>> import numpy as np
        >>> member = np.array([True, False] * 50)
        >>> scores = np.where(member, 2.0, 0.0) + np.arange(100) % 7  # a noisy attacker
        >>> bound = epsilon_lower_bound(scores, member)
        >>> round(bound.epsilon, 2), bound.guesses, bound.correct
        (1.6, 24, 24)
    """
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigurationError(
            f"`scores` must be numbers, one per canary, got {type(scores).__name__}") from exc
    b = np.asarray(is_member)
    if s.ndim != 1 or b.ndim != 1 or s.shape != b.shape:
        raise ConfigurationError(
            "`scores` and `is_member` must have one entry per canary, got shapes "
            f"{tuple(s.shape)} and {tuple(b.shape)}"
        )
    if s.size == 0:
        raise ConfigurationError("`scores` must hold at least one canary, got none")
    if b.dtype != np.bool_:
        raise ConfigurationError(f"`is_member` must be booleans, got {b.dtype}")
    positive_int("seed", seed, minimum=0)
    delta = probability("delta", delta, open_low=False)
    confidence = probability("confidence", confidence)
    m = int(s.size)
    finite = np.flatnonzero(np.isfinite(s))
    grid = guess_counts(len(finite))
    if not grid:
        return EpsilonBound(0.0, confidence, delta, m, 0, 0)
    # ascending score, ties in a random order that knows nothing of the coins
    tie_break = np.random.default_rng(seed).permutation(len(finite))
    order = finite[np.lexsort((tie_break, s[finite]))]
    each = 1.0 - (1.0 - confidence) / len(grid)
    best = EpsilonBound(0.0, confidence, delta, m, 0, 0)
    for k in grid:
        correct = int(b[order[-k:]].sum()) + int((~b[order[:k]]).sum())
        eps = epsilon_from_guesses(m, 2 * k, correct, delta=delta, confidence=each)
        if eps > best.epsilon:
            best = EpsilonBound(eps, confidence, delta, m, 2 * k, correct)
    return best


def best_attainable_epsilon(canaries: int, *, delta: float = 1e-5,
                            confidence: float = 0.95) -> float:
    """The largest bound ``canaries`` randomised canaries can give: every guess right.

    Example:
        >>> [round(best_attainable_epsilon(m), 2) for m in (100, 1000)]
        [3.1, 5.37]
    """
    m = positive_int("canaries", canaries)
    each = 1.0 - (1.0 - confidence) / max(1, len(guess_counts(m)))
    return max((epsilon_from_guesses(m, 2 * k, 2 * k, delta=delta, confidence=each)
                for k in guess_counts(m)), default=0.0)
