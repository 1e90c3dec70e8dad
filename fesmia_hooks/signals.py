"""What the probe reads from the victim: per-sample signals and optional embeddings.

Every signal is computed in log space from the logits, never through softmax probabilities,
so that a saturated model (members at probability 1.0 in float32) still separates members from
non-members (see ``docs/science.md#signals``). Signals are oriented so that *higher means more
member-like*.

All signals live in one table, :data:`SIGNALS`, and every list of names derives from it:
:data:`CLASSIFICATION_SIGNALS` here, :data:`~fesmia_hooks.text.SEQUENCE_SIGNALS` and the
per-token statistics of :mod:`fesmia_hooks.text`, and the probe's accepted names. A
:class:`Signal` either has a ``per_row`` function -- one number per row of logits, used as is
for a classifier (one row per sample) and, for a causal language model, per scored token and
averaged over the tokens -- or is ``sequence_only`` and ``reads`` a per-token statistic of the
table (``min_k``, ``zlib`` and ``positions`` read ``log_prob``).

To add a signal, add one entry to :data:`SIGNALS`:

* a per-row signal: ``Signal("name", per_row=f)``, where ``f(rows)`` takes a :class:`Rows`
  (logit rows ``rows.z`` ``[R, V]`` float32, targets ``rows.y`` ``[R, 1]``, and the pieces
  the signals share -- ``z_y``, ``logsumexp``, ``log_softmax``, ``others`` -- computed once
  per block) and returns ``[R]`` float32, higher = more member-like, in log space.
  Nothing else changes: :func:`classification_signals`,
  :func:`fesmia_hooks.text.token_statistics` and the sequence signals (as a per-token
  mean) pick it up, and so do the lists of names;
* a sequence-only signal: ``Signal("name", reads="log_prob", sequence_rank=...)``, plus its
  reduction of the per-token values in :func:`fesmia_hooks.text.sequence_signals` (where
  the sequence-level options, such as ``k``, ``zlib_bytes`` or ``bins``, are at hand);

then describe it in :func:`classification_signals` or the :mod:`fesmia_hooks.text` module
docstring, and in ``docs/science.md#signals``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

from fesmia_hooks.exceptions import ConfigurationError, ProbeError

__all__ = [
    "CLASSIFICATION_SIGNALS",
    "DEFAULT_SIGNALS",
    "SIGNALS",
    "Rows",
    "Signal",
    "SignalFn",
    "SignalIndex",
    "classification_signals",
    "extract_logits",
    "index_signals",
    "row_signals",
]

SignalFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Rows:
    """A block of logit rows and their targets, with the pieces the signals share.

    Each piece is computed on first use and kept for the other signals of the block.

    Args:
        z: ``[R, V]`` float32 logits.
        y: ``[R]`` (or ``[R, 1]``) target indices, each in ``[0, V)``.

    Example:
        >>> r = Rows(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([2]))
        >>> r.z_y.tolist(), r.others.tolist()
        ([1.0], [[2.0, 0.0, -inf]])
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.z = z
        self.y = y.long().reshape(-1, 1)

    @cached_property
    def z_y(self) -> torch.Tensor:
        """``[R]``: the target's logit."""
        return self.z.gather(1, self.y).squeeze(1)

    @cached_property
    def logsumexp(self) -> torch.Tensor:
        """``[R]``: ``logsumexp_j z_j``."""
        return torch.logsumexp(self.z, dim=1)

    @cached_property
    def log_softmax(self) -> torch.Tensor:
        """``[R, V]``: ``z_j - logsumexp_k z_k`` (one fused pass)."""
        return torch.log_softmax(self.z, dim=1)

    @cached_property
    def others(self) -> torch.Tensor:
        """``[R, V]``: the logits with the target's set to ``-inf``."""
        return self.z.scatter(1, self.y, float("-inf"))


def _phi(r: Rows) -> torch.Tensor:
    return r.z_y - torch.logsumexp(r.others, dim=1)


def _log_prob(r: Rows) -> torch.Tensor:
    return r.log_softmax.gather(1, r.y).squeeze(1)


def _margin(r: Rows) -> torch.Tensor:
    return r.z_y - r.others.amax(dim=1)


def _neg_entropy(r: Rows) -> torch.Tensor:
    # a -inf logit (a masked token) adds 0 * finfo.min = 0, not 0 * -inf = NaN
    floor = torch.finfo(r.log_softmax.dtype).min
    return (torch.softmax(r.z, 1) * r.log_softmax.clamp_min(floor)).sum(1)


def _max_logit_gap(r: Rows) -> torch.Tensor:
    top = r.z.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@dataclass(frozen=True)
class Signal:
    """One entry of :data:`SIGNALS`.

    Attributes:
        name: The name users pass in ``signals=`` / ``names=``.
        per_row: ``f(rows: Rows) -> Tensor[R]``, the statistic of each logit row; None for a
            sequence-only signal.
        reads: For a sequence-only signal, the per-row signal of the table whose per-token
            values it reduces (its reduction lives in
            :func:`fesmia_hooks.text.sequence_signals`); None for a per-row signal.
        sequence_rank: Where it goes in :data:`~fesmia_hooks.text.SEQUENCE_SIGNALS`, which
            lists the signals by rank and then in table order: 0 the text attacks on token
            log-probabilities, 1 (the default) per-token statistics averaged, 2 profiles.
    """

    name: str
    per_row: Callable[[Rows], torch.Tensor] | None = None
    reads: str | None = None
    sequence_rank: int = 1

    def __post_init__(self) -> None:
        if (self.per_row is None) == (self.reads is None):
            raise ConfigurationError(
                f"signal {self.name!r} needs exactly one of `per_row` and `reads`"
            )

    @property
    def sequence_only(self) -> bool:
        """Whether only token sequences have it (it has no per-row function)."""
        return self.per_row is None

    @property
    def token_statistic(self) -> str:
        """The per-token statistic a sequence signal of this name is computed from."""
        return self.reads if self.reads is not None else self.name


#: The signals, each "higher = more member-like". The table order is that of
#: :data:`CLASSIFICATION_SIGNALS` (the per-row signals) followed by the sequence-only ones.
SIGNALS: tuple[Signal, ...] = (
    Signal("phi", per_row=_phi),
    Signal("log_prob", per_row=_log_prob, sequence_rank=0),
    Signal("margin", per_row=_margin),
    Signal("neg_entropy", per_row=_neg_entropy),
    Signal("max_logit_gap", per_row=_max_logit_gap),
    Signal("min_k", reads="log_prob", sequence_rank=0),
    Signal("zlib", reads="log_prob", sequence_rank=0),
    Signal("positions", reads="log_prob", sequence_rank=2),
)


class SignalIndex(NamedTuple):
    """The lists of names derived from a table of signals (see :func:`index_signals`).

    Attributes:
        classification: The per-row signals, in table order.
        sequence: All signals, by ``sequence_rank`` and then in table order.
        token_statistics: The per-row signals, in the order of ``sequence``.
        reads: Each sequence signal's per-token statistic.
        by_name: Each signal by its name.
    """

    classification: tuple[str, ...]
    sequence: tuple[str, ...]
    token_statistics: tuple[str, ...]
    reads: dict[str, str]
    by_name: dict[str, Signal]


def index_signals(table: Sequence[Signal]) -> SignalIndex:
    """The lists of names of a table of signals, checked.

    Example:
        >>> index_signals(SIGNALS).reads["min_k"]
        'log_prob'
    """
    by_name = {s.name: s for s in table}
    if len(by_name) != len(table):
        raise ConfigurationError(f"signal names repeat in {[s.name for s in table]}")
    for s in table:
        if s.reads is not None and (s.reads not in by_name or by_name[s.reads].sequence_only):
            raise ConfigurationError(
                f"signal {s.name!r} reads {s.reads!r}, which is not a per-row signal"
            )
    ordered = sorted(table, key=lambda s: s.sequence_rank)  # stable: table order within
    return SignalIndex(
        classification=tuple(s.name for s in table if not s.sequence_only),
        sequence=tuple(s.name for s in ordered),
        token_statistics=tuple(s.name for s in ordered if not s.sequence_only),
        reads={s.name: s.token_statistic for s in ordered},
        by_name=by_name,
    )


_INDEX = index_signals(SIGNALS)

#: Names of the built-in classification signals, each "higher = more member-like".
CLASSIFICATION_SIGNALS: tuple[str, ...] = _INDEX.classification
#: The signals a classifier's canaries get unless told otherwise.
DEFAULT_SIGNALS: tuple[str, ...] = ("phi", "log_prob", "margin", "neg_entropy")


def row_signals(z: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    """The per-row signals ``names`` of logit rows ``z`` ``[R, V]`` against targets ``y`` ``[R]``.

    One ``[R]`` tensor per name, each from the ``per_row`` function of :data:`SIGNALS`,
    sharing the pieces of one :class:`Rows`. The names and targets are not checked here
    (:func:`classification_signals` and :func:`fesmia_hooks.text.token_statistics` do).

    Example:
        >>> [round(float(v), 4) for v in row_signals(torch.zeros(1, 4), torch.tensor([1]),
        ...                                           ["log_prob", "margin"])]
        [-1.3863, 0.0]
    """
    rows = Rows(z, y)
    out = []
    for name in names:
        per_row = _INDEX.by_name[name].per_row
        if per_row is None:
            raise ConfigurationError(f"{name!r} is a sequence signal, with no per-row value")
        out.append(per_row(rows))
    return out


def extract_logits(output: Any) -> torch.Tensor:
    """The logits inside a model's output.

    Accepts a tensor, a tuple or list (first element), a mapping with ``"logits"``, or an
    object with a ``.logits`` attribute (as Hugging Face models return).

    Example:
        >>> extract_logits({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ProbeError(
        "the model's output holds no logits: expected a tensor, a tuple/list whose first "
        "element is a tensor, a dict with 'logits' or an object with .logits, "
        f"got {type(output).__name__}"
    )


def classification_signals(
    logits: torch.Tensor, targets: torch.Tensor, names: Sequence[str] = CLASSIFICATION_SIGNALS
) -> torch.Tensor:
    """Per-sample membership signals from classification logits, ``[B, len(names)]`` float32.

    * ``phi``: logit-scaled confidence ``z_y - logsumexp_{j != y} z_j`` (Carlini et al. 2022).
    * ``log_prob``: ``log p_y`` (minus the cross-entropy loss).
    * ``margin``: ``z_y - max_{j != y} z_j``.
    * ``neg_entropy``: minus the entropy of the predictive distribution.
    * ``max_logit_gap``: top logit minus the second, label-free confidence.

    Example:
        >>> z = torch.tensor([[60.0, 0.0, 0.0]])  # saturated in float32 softmax
        >>> s = classification_signals(z, torch.tensor([0]), ["phi", "log_prob"])
        >>> round(float(s[0, 0]), 2), float(s[0, 1])
        (59.31, 0.0)
    """
    unknown = [n for n in names if n not in _INDEX.classification]
    if unknown:
        raise ConfigurationError(
            f"unknown signal(s) {unknown}; allowed: {', '.join(_INDEX.classification)}"
        )
    z = logits.float()
    if z.dim() == 1 and z.shape[0] == targets.numel():  # one logit per sample, squeezed
        z = z[:, None]
    if z.dim() != 2:
        raise ProbeError(f"classification logits must be [batch, classes], got {tuple(z.shape)}")
    if z.shape[1] == 1:
        # a binary classifier's one logit (trained with BCEWithLogitsLoss): p(1) = sigmoid(z),
        # the softmax of [0, z]; labels 0 and 1
        z = torch.cat([torch.zeros_like(z), z], dim=1)
    y = targets.long().reshape(-1, 1)
    outside = int(((y < 0) | (y >= z.shape[1])).sum())
    if outside:
        raise ProbeError(
            f"{outside} canary label(s) fall outside the model's {z.shape[1]} classes"
        )
    return torch.stack(row_signals(z, y, names), dim=1)
