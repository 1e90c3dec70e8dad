"""Few-shot learners for membership inference, batched over episodes.

Every learner has the same signature::

    learner(support, query, shots, **options) -> scores

with ``support`` of shape ``[G, 2 * shots, F]`` (the first ``shots`` rows of each episode are
members, the rest non-members), ``query`` of shape ``[G, 2 * queries, F]`` and ``scores`` of
shape ``[G, 2 * queries]``, higher meaning "more likely a member". ``G`` counts episodes (and
label permutations): all of them are solved at once with tensor operations on the features'
device, with no Python loop over episodes. Scores are log-odds or distance ratios rather than
probabilities so that they do not saturate into ties.

Add your own learner with :func:`register_learner` (then ``FeSMIA(method="name")``), or pass
the function itself as ``FeSMIA(method=fn)``; it receives the same arguments, and the
keyword-only parameters of its signature are the options ``learner_options`` may set.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from fesmia_hooks.exceptions import ConfigurationError

__all__ = [
    "LEARNERS",
    "Learner",
    "finetune",
    "get_learner",
    "laplacianshot",
    "learner_name",
    "register_learner",
    "simpleshot",
    "threshold",
]

Learner = Callable[..., torch.Tensor]


def _centroids(support: torch.Tensor, shots: int) -> torch.Tensor:
    """``[G, 2, F]``: the member centroid, then the non-member centroid."""
    return torch.stack([support[:, :shots].mean(1), support[:, shots:].mean(1)], dim=1)


def _centroid_distances(support: torch.Tensor, query: torch.Tensor, shots: int) -> torch.Tensor:
    """Squared distances ``[G, Q, 2]`` of each query to the two support centroids."""
    cent = _centroids(support, shots)
    cross = torch.bmm(query, cent.transpose(1, 2))
    squared = query.pow(2).sum(-1, keepdim=True) - 2 * cross + cent.pow(2).sum(-1)[:, None, :]
    return squared.clamp_min(0)


def simpleshot(support: torch.Tensor, query: torch.Tensor, shots: int) -> torch.Tensor:
    """SimpleShot (Wang et al. 2019): nearest centroid, read as member log-odds.

    The score is ``d_n^2 - d_m^2``, the squared distance to the non-member centroid minus
    that to the member centroid: the log-odds of nearest-centroid classification under an
    isotropic Gaussian (as in prototypical networks), up to a scale. The paper's code votes
    with inverse distances instead; that weighting is not monotone past a centroid and
    pulls the most extreme samples, where Log-MIA reads, back towards 0.5. Features arrive
    already centred (and, for embeddings, L2-normalised) on the whole canary pool.

    Example:
        >>> s = torch.tensor([[[1.0], [0.9], [-1.0], [-0.9]]])
        >>> q = torch.tensor([[[3.0], [0.8], [-0.8]]])
        >>> simpleshot(s, q, shots=2).argsort(descending=True)
        tensor([[0, 1, 2]])
    """
    return simpleshot_rows(torch.cat([support, query], dim=-2), shots)


def simpleshot_rows(rows: torch.Tensor, shots: int) -> torch.Tensor:
    """SimpleShot scores ``[..., Q]`` of episodes laid out as rows ``[..., 2s + Q, F]``.

    ``d_n^2 - d_m^2 = 2 q.(c_m - c_n) + |c_n|^2 - |c_m|^2``, in float64, summing over shots
    and then over features left to right: the operations, in the order, of the compiled
    loop (:mod:`fesmia_hooks.fused`), so that both give identical scores.

    Example:
        >>> rows = torch.tensor([[[1.0], [-1.0], [3.0], [0.0]]])
        >>> simpleshot_rows(rows, shots=1).tolist()
        [[12.0, 0.0]]
    """
    rows = rows.to(torch.float64)
    member, non_member = rows[..., 0, :], rows[..., shots, :]
    for i in range(1, shots):
        member = member + rows[..., i, :]
        non_member = non_member + rows[..., shots + i, :]
    member, non_member = member / shots, non_member / shots
    bias = _ordered_sum(non_member * non_member) - _ordered_sum(member * member)
    diff = member - non_member
    query = rows[..., 2 * shots :, :]
    dot = query[..., 0] * diff[..., None, 0]
    for f in range(1, query.shape[-1]):
        dot = dot + query[..., f] * diff[..., None, f]
    return 2.0 * dot + bias[..., None]


def _ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension, left to right (torch's ``sum`` may pair terms)."""
    out = t[..., 0]
    for f in range(1, t.shape[-1]):
        out = out + t[..., f]
    return out


def threshold(
    support: torch.Tensor, query: torch.Tensor, shots: int, *, signal_index: int = 0
) -> torch.Tensor:
    """Baseline with no learning: the score is one signal (by default the first, ``phi``).

    Example:
        >>> threshold(torch.zeros(1, 2, 2), torch.tensor([[[3.0, 0.0], [1.0, 9.0]]]), 1)
        tensor([[3., 1.]])
    """
    del support, shots
    return query[..., signal_index]


def laplacianshot(
    support: torch.Tensor,
    query: torch.Tensor,
    shots: int,
    *,
    lam: float = 0.5,
    knn: int = 3,
    iterations: int = 20,
) -> torch.Tensor:
    """LaplacianShot (Ziko et al. 2020): SimpleShot's unary term plus a kNN graph on queries.

    Bound updates ``y_q <- softmax(-a_q + lam * sum_p W_qp y_p)`` run for ``iterations``
    steps; ``a_q`` are squared distances to the two centroids and ``W`` is the symmetric
    ``knn``-nearest-neighbour graph of the (unlabelled) query features. The score is the
    member log-odds of the last update.
    """
    unary = _centroid_distances(support, query, shots)
    n = query.shape[1]
    k = max(1, min(knn, n - 1))
    pair = torch.cdist(query, query)
    pair.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    nearest = pair.topk(k, dim=-1, largest=False).indices
    w = torch.zeros_like(pair).scatter_(-1, nearest, 1.0)
    w = 0.5 * (w + w.transpose(1, 2))
    logits = -unary
    for _ in range(iterations):
        logits = -unary + lam * torch.bmm(w, torch.softmax(logits, dim=-1))
    return logits[..., 0] - logits[..., 1]


def finetune(
    support: torch.Tensor,
    query: torch.Tensor,
    shots: int,
    *,
    epochs: int = 25,
    lr: float = 0.01,
    temperature: float = 10.0,
) -> torch.Tensor:
    """Transductive fine-tuning (after Dhillon et al. 2020) of a linear head per episode.

    The head ``Dense(2)`` starts from the L2-normalised support centroids (bias 0). Each
    epoch takes one Adam step on the support cross-entropy and one on the entropy of
    ``softmax(logits / temperature)`` over the unlabelled queries. The victim is frozen: the
    head reads its signals or embeddings. The paper's code fine-tunes the whole victim copy
    with lr 5e-5 and validation early stopping; a monitor that runs during training fits a
    head for a fixed number of epochs with a larger rate instead. The score is the member
    log-odds of the query.
    """
    cent = _centroids(support, shots)
    weight = (cent / cent.norm(dim=-1, keepdim=True).clamp_min(1e-6)).transpose(1, 2)
    weight = weight.detach().clone().requires_grad_(True)
    bias = torch.zeros(support.shape[0], 1, 2, device=support.device, requires_grad=True)
    target = torch.cat(
        [
            torch.zeros(shots, dtype=torch.long, device=support.device),
            torch.ones(shots, dtype=torch.long, device=support.device),
        ]
    ).repeat(support.shape[0])
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            logits = torch.bmm(support, weight) + bias
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), target, reduction="sum")
            loss.backward()
            opt.step()
            opt.zero_grad()
            q = (torch.bmm(query, weight) + bias) / temperature
            ent = -(torch.softmax(q, -1) * torch.log_softmax(q, -1)).sum()
            ent.backward()
            opt.step()
    with torch.no_grad():
        logits = torch.bmm(query, weight) + bias
    return (logits[..., 0] - logits[..., 1]).detach()


#: Learner name -> function.
LEARNERS: dict[str, Learner] = {
    "simpleshot": simpleshot,
    "laplacianshot": laplacianshot,
    "finetune": finetune,
    "threshold": threshold,
}


def register_learner(name: str, fn: Learner, *, replace: bool = False) -> None:
    """Make ``fn`` available as ``FeSMIA(method=name)``.

    Args:
        name: The name to register.
        fn: ``fn(support, query, shots, **options) -> scores`` (see the module docstring).
        replace: Allow replacing a learner already registered under ``name``.

    Raises:
        ConfigurationError: On a name that is taken (without ``replace``) or not a string,
            or an ``fn`` that is not callable.

    Example:
        >>> def farthest(support, query, shots):
        ...     return query.norm(dim=-1)
        >>> register_learner("farthest", farthest)
        >>> "farthest" in LEARNERS
        True
        >>> del LEARNERS["farthest"]
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a learner's name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise ConfigurationError(f"a learner must be callable, got {type(fn).__name__}")
    if name in LEARNERS and not replace:
        raise ConfigurationError(
            f"a learner named {name!r} is already registered; pass replace=True to replace it"
        )
    LEARNERS[name] = fn


def learner_name(method: str | Learner) -> str:
    """The name a learner is reported under: its registered name, or the function's name."""
    if isinstance(method, str):
        return method
    return str(getattr(method, "__name__", type(method).__name__))


def get_learner(
    method: str | Learner, options: dict[str, Any] | None = None
) -> Callable[..., torch.Tensor]:
    """The learner ``method`` (a registered name or a function) with ``options`` bound.

    Raises:
        ConfigurationError: On an unknown name, or options the learner does not take.
    """
    if callable(method):
        fn, name = method, learner_name(method)
    elif method in LEARNERS:
        fn, name = LEARNERS[method], method
    else:
        allowed = ", ".join(repr(n) for n in LEARNERS)
        raise ConfigurationError(
            f"`method` must be one of {allowed} or a learner function, got {method!r}"
        )
    opts = dict(options or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - callables without a signature
        return functools.partial(fn, **opts)
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    allowed_opts = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(allowed_opts))
    if unknown and not takes_any:
        raise ConfigurationError(
            f"`learner_options` {unknown} are not options of {name!r}; allowed: {allowed_opts}"
        )
    return functools.partial(fn, **opts)
