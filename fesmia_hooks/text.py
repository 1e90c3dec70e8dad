"""Causal language models: membership signals of token sequences, in log space.

A text :class:`~fesmia_hooks.CanarySet` (built with
:meth:`~fesmia_hooks.CanarySet.from_sequences`) holds token ids ``[N, T]``, an attention mask
``[N, T]``, next-token targets ``[N, T]`` (``targets[:, t]`` is scored against the logits at
position ``t``; ``-100`` where nothing is scored) and the zlib-compressed length of each
sequence. The probe forwards the ids through the model -- with ``attention_mask=`` when the
model's ``forward`` takes one, and ``use_cache=False`` when it takes that -- reads ``[B, T,
V]`` logits (a tensor, or an output with ``.logits`` as Hugging Face causal LMs return) and
reduces them to a few numbers per sequence. Every signal is computed from the logits in log
space, never through softmax probabilities (see ``docs/science.md#signals``), and is oriented
so that *higher means more member-like*:

* ``log_prob``: mean token log-probability over the scored tokens, i.e. minus the mean
  negative log-likelihood (the loss attack, Yeom et al. 2018).
* ``min_k``: Min-K% Prob (Shi et al., ICLR 2024): the mean of the lowest ``k`` share of the
  token log-probabilities (``floor(k * L)`` tokens of a sequence with ``L`` scored tokens,
  at least one).
* ``zlib``: ``log_prob`` divided by the sequence's zlib-compressed length in bytes (Carlini
  et al., USENIX Security 2021, in the form of Shi et al.'s code): text that is easy for the
  model but hard for zlib is suspect. The length is a property of the text, computed once
  when the canary set is built.
* ``phi``, ``margin``, ``neg_entropy``, ``max_logit_gap``: the classification signals of
  :func:`fesmia_hooks.classification_signals` for every token, averaged over the scored
  tokens (the same per-row functions, from the table :data:`fesmia_hooks.signals.SIGNALS`,
  from which :data:`SEQUENCE_SIGNALS` derives too).
* ``positions``: the mean token log-probability in each of ``bins`` equal parts of each
  sequence's scored tokens (``bins`` columns): a per-position profile for the few-shot
  learners.

Memory is bounded twice (by :func:`~fesmia_hooks.features.compute_features`, for the built-in
signals and for a :class:`SequenceSignals`; any other ``signal_fn`` gets ``batch_size``
sequences at a time). The canaries are forwarded ``rows`` sequences at a time, with
``rows = min(batch_size, max(1, max_logit_elements // (T * V)))``: the model is never asked
for more than ``max(max_logit_elements, T * V)`` logits at once (one sequence always goes
whole; splitting it would change what a causal model sees). By default
(``max_logit_elements="auto"``, :func:`logit_budget`) the bound is sized from the memory free
on the model's device when the check runs: a quarter of it, at 8 bytes per logit (the float32
logits and one copy), between ``2**22`` and ``2**28`` logits (16 MiB to 1 GiB of float32
logits). GPT-2 at 128 tokens (6.4 M logits a sequence) then forwards 128 canaries in 4
passes on a device with 8 GiB free (7 with 4 GiB), where a fixed ``2**24`` took 64. The
reductions then read those logits in blocks of ``max(1, chunk_elements // V)`` positions --
in place where at least half of a block is scored, its scored rows gathered otherwise: a
block's float32 log-softmax and its copies take a few times ``max(chunk_elements, V)``
floats (2 MiB per block copy with the default ``2**19``), plus ``O(rows * T)`` floats of
per-token statistics. A batch that does not fit after all is retried at half its size.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> targets = torch.tensor([[1, 2, -100]])
    >>> sequence_signals(logits, targets, ["log_prob", "min_k"])
    tensor([[-1.3863, -1.3863]])
"""

from __future__ import annotations

import inspect
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fesmia_hooks.exceptions import ConfigurationError, ProbeError
from fesmia_hooks.signals import SIGNALS, extract_logits, index_signals, row_signals

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_MAX_LOGIT_ELEMENTS",
    "DEFAULT_SEQUENCE_SIGNALS",
    "IGNORE_INDEX",
    "LOGIT_BUDGET_BOUNDS",
    "SEQUENCE_SIGNALS",
    "SequenceSignals",
    "forward_logits",
    "logit_budget",
    "sequence_signals",
    "token_statistics",
    "zlib_length",
    "decoded_texts",
    "zlib_lengths",
]

_INDEX = index_signals(SIGNALS)

#: Target value of a position whose next token is not scored.
IGNORE_INDEX = -100
#: Names of the built-in sequence signals, each "higher = more member-like" (from
#: :data:`fesmia_hooks.signals.SIGNALS`).
SEQUENCE_SIGNALS: tuple[str, ...] = _INDEX.sequence
#: The signals token-sequence canaries get unless told otherwise.
DEFAULT_SEQUENCE_SIGNALS: tuple[str, ...] = ("log_prob", "min_k", "zlib")
#: Most logits the probe asks the model for in one forward pass when memory cannot be read
#: (unless one sequence is more).
DEFAULT_MAX_LOGIT_ELEMENTS = 2**24
#: Bounds of the memory-sized budget of :func:`logit_budget`, in logits.
LOGIT_BUDGET_BOUNDS = (2**22, 2**28)
#: Most logits reduced at once (unless one position's vocabulary is more): blocks of 2 MiB
#: of float32, whose few temporaries the CPU allocator reuses; blocks of 8 MiB were paged in
#: afresh each time (measured on a CPU: the four default signals of 1,024 positions of a
#: 50,257-token vocabulary took 0.44 s in blocks of ``2**21``, 0.22 s in blocks of ``2**19``).
DEFAULT_CHUNK_ELEMENTS = 2**19

# The per-token statistics (the per-row signals of the table), and which one each sequence
# signal reads. The functions below read them from _INDEX.
_TOKEN_STATS: tuple[str, ...] = _INDEX.token_statistics
_NEEDS: dict[str, str] = _INDEX.reads


def zlib_length(data: bytes | str) -> int:
    """Length in bytes of ``data`` compressed by zlib (a ``str`` is encoded as UTF-8).

    Example:
        >>> zlib_length("a" * 1000) < zlib_length(bytes(range(256)) * 4)
        True
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return len(zlib.compress(raw))


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not names:
        raise ConfigurationError(
            f"`names` must be a non-empty sequence of signal names, got {names!r}"
        )
    unknown = [n for n in names if n not in _INDEX.sequence]
    if unknown:
        raise ConfigurationError(
            f"unknown sequence signal(s) {unknown}; allowed: {', '.join(_INDEX.sequence)}"
        )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"`names` must not repeat a signal, got {list(names)}")
    return tuple(names)


def token_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    stats: Sequence[str] = ("log_prob",),
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """Per-token statistics ``[B, T]`` float32 of the scored positions (NaN elsewhere).

    Only the scored positions (``targets != -100``) are reduced, ``max(1, chunk_elements //
    V)`` of them at a time, each in float32 whatever the logits' dtype, by the same per-row
    functions as :func:`~fesmia_hooks.classification_signals`
    (:func:`fesmia_hooks.signals.row_signals`).

    Args:
        logits: ``[B, T, V]``.
        targets: ``[B, T]`` next-token targets aligned with ``logits``; ``-100`` is ignored.
        stats: Any of the per-row signals of :data:`fesmia_hooks.signals.SIGNALS`:
            ``log_prob`` (``log p_y``), ``phi`` (``z_y - logsumexp_{j != y} z_j``), ``margin``
            (``z_y - max_{j != y} z_j``), ``neg_entropy`` and ``max_logit_gap`` (top logit
            minus the second).
        chunk_elements: Logits reduced at once.

    Returns:
        ``{name: Tensor[B, T]}``.

    Example:
        >>> z = torch.tensor([[[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
        >>> s = token_statistics(z, torch.tensor([[0, -100]]), ["log_prob", "phi"])
        >>> s["log_prob"].tolist(), round(float(s["phi"][0, 0]), 2)
        ([[0.0, nan]], 59.31)
    """
    if logits.dim() != 3:
        raise ProbeError(
            f"a causal language model must return [batch, length, vocab] logits, "
            f"got shape {tuple(logits.shape)}"
        )
    b, t, v = logits.shape
    if targets.shape != (b, t):
        raise ProbeError(
            f"the model returned logits for [batch={b}, length={t}] but the canary batch is "
            f"{tuple(targets.shape)}"
        )
    if v < 2:
        raise ProbeError(f"language-model logits need a vocabulary of at least 2, got {v}")
    unknown = [s for s in stats if s not in _INDEX.token_statistics]
    if unknown:
        raise ConfigurationError(
            f"unknown token statistic(s) {unknown}; allowed: {_INDEX.token_statistics}"
        )
    flat_targets = targets.reshape(-1)
    scored_at = flat_targets != IGNORE_INDEX
    where = scored_at.nonzero().squeeze(1)
    scored = flat_targets[where]
    # Messages give counts, never token ids: canary text stays private.
    outside = int(((scored < 0) | (scored >= v)).sum()) if scored.numel() else 0
    if outside:
        raise ProbeError(
            f"{outside} canary token target(s) lie outside the model's vocabulary of {v} "
            f"tokens (allowed: [0, {v}), or -100 where nothing is scored)"
        )
    full = {s: torch.full((b * t,), float("nan"), dtype=torch.float32, device=logits.device)
            for s in stats}
    for z, at in _logit_blocks(logits, where, max(1, int(chunk_elements) // v)):
        # a span read in place holds unscored positions too: they read class 0, then NaN
        per_row = row_signals(z.float(), flat_targets[at].clamp_min(0), stats)
        for s, value in zip(stats, per_row, strict=True):
            full[s][at] = value
    return {s: full[s].masked_fill_(~scored_at, float("nan")).reshape(b, t) for s in stats}


def _logit_blocks(
    logits: torch.Tensor, where: torch.Tensor, step: int
) -> Iterator[tuple[torch.Tensor, slice | torch.Tensor]]:
    """The logit rows of the scored positions ``where`` (flat, ascending), ``step`` at a time.

    Yields ``(z, at)``. The flat positions are cut into spans of ``step``; a span at least
    half scored, of contiguous logits, is read in place, every row of it (``at`` the span's
    ``slice``): no copy, and its few unscored rows cost less than gathering the others. The
    scored positions of the other spans are gathered, ``step`` rows at a time (``at`` their
    flat positions), so sparse targets (a masked prompt) still make few large blocks.
    """
    b, t, v = logits.shape
    flat = logits.view(b * t, v) if logits.is_contiguous() else None
    rest = where
    if flat is not None:
        span = torch.div(where, step, rounding_mode="floor")  # each scored position's span
        spans = (b * t + step - 1) // step
        scored = torch.bincount(span, minlength=spans)
        length = torch.full_like(scored, step)
        length[-1] = b * t - (spans - 1) * step
        dense = 2 * scored >= length
        for i in dense.nonzero().squeeze(1).tolist():
            span_at = slice(i * step, min((i + 1) * step, b * t))
            yield flat[span_at], span_at
        rest = where[~dense[span]]
    for first in range(0, rest.numel(), step):
        at = rest[first : first + step]
        yield (flat.index_select(0, at) if flat is not None else logits[at // t, at % t]), at


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum(1).clamp_min(1)
    return torch.where(valid, x, torch.zeros_like(x)).sum(1) / count


def _min_k(log_prob: torch.Tensor, valid: torch.Tensor, k: float) -> torch.Tensor:
    length = valid.sum(1)
    take = torch.clamp(torch.floor(length.double() * k).long(), min=1)
    # The lowest ``most >= take`` of each row, ascending (no full sort, no device sync).
    most = max(1, math.floor(log_prob.shape[1] * k))
    lowest = torch.where(valid, log_prob, torch.full_like(log_prob, float("inf"))).topk(
        most, dim=1, largest=False).values
    keep = torch.arange(most, device=log_prob.device)[None, :] < take[:, None]
    low = torch.where(keep, lowest, torch.zeros_like(lowest)).sum(1) / take
    # a NaN token (the model's output) would rank above every value and drop out: keep it
    return torch.where((valid & log_prob.isnan()).any(1), torch.full_like(low, math.nan), low)


def _position_bins(log_prob: torch.Tensor, valid: torch.Tensor, bins: int) -> torch.Tensor:
    length = valid.sum(1, keepdim=True)
    rank = valid.long().cumsum(1) - 1  # rank of each scored token among its row's
    which = torch.div(rank.clamp_min(0) * bins, length.clamp_min(1), rounding_mode="floor")
    which = which.clamp(0, bins - 1)
    value = torch.where(valid, log_prob, torch.zeros_like(log_prob))
    total = torch.zeros(log_prob.shape[0], bins, dtype=torch.float32, device=log_prob.device)
    count = torch.zeros_like(total)
    total.scatter_add_(1, which, value)
    count.scatter_add_(1, which, valid.float())
    mean = _masked_mean(log_prob, valid)[:, None].expand_as(total)
    return torch.where(count > 0, total / count.clamp_min(1), mean)  # an empty bin: row mean


def sequence_signals(
    logits: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str] = DEFAULT_SEQUENCE_SIGNALS,
    *,
    k: float = 0.2,
    zlib_bytes: torch.Tensor | None = None,
    bins: int = 4,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-sequence membership signals from causal-LM logits, ``[B, F]`` float32.

    ``F`` is ``len(names)``, plus ``bins - 1`` when ``positions`` is asked for (its
    ``bins`` columns take its place in the order of ``names``). See the module docstring
    for each signal.

    Args:
        logits: ``[B, T, V]`` logits; position ``t`` predicts ``targets[:, t]``.
        targets: ``[B, T]`` next-token targets, ``-100`` where nothing is scored (padding).
        names: Signals to compute, from :data:`SEQUENCE_SIGNALS`.
        k: Share of the lowest token log-probabilities that ``min_k`` averages, in (0, 1].
        zlib_bytes: ``[B]`` zlib-compressed lengths of the sequences, needed by ``zlib``.
        bins: Columns of ``positions``.
        chunk_elements: Logits reduced at once (see the module docstring).

    Returns:
        The signals, one row per sequence.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
        >>> s = sequence_signals(z, torch.tensor([[0, 0, -100]]), ["log_prob", "min_k"], k=0.5)
        >>> [round(v, 4) for v in s[0].tolist()]  # log p = -0.1269, -2.1269
        [-1.1269, -2.1269]
    """
    names = _check_names(names)
    k = _check_k(k)
    bins = _check_bins(bins)
    needed = tuple(dict.fromkeys(_INDEX.reads[n] for n in names))
    stats = token_statistics(logits, targets, needed, chunk_elements=chunk_elements)
    valid = targets != IGNORE_INDEX
    if not bool(valid.any(1).all()):
        raise ProbeError("every canary sequence needs at least one scored target, got none")
    columns: list[torch.Tensor] = []
    for name in names:
        lp = stats["log_prob"] if "log_prob" in stats else None
        if name == "min_k":
            assert lp is not None
            columns.append(_min_k(lp, valid, k)[:, None])
        elif name == "zlib":
            assert lp is not None
            if zlib_bytes is None:
                raise ConfigurationError(
                    "the 'zlib' signal needs the zlib lengths of the sequences (`zlib_bytes`); "
                    "a CanarySet built with from_sequences carries them"
                )
            size = zlib_bytes.to(device=logits.device, dtype=torch.float32).reshape(-1)
            if size.shape[0] != logits.shape[0]:
                raise ProbeError(
                    f"`zlib_bytes` must hold one length per sequence ({logits.shape[0]}), "
                    f"got {size.shape[0]}"
                )
            columns.append((_masked_mean(lp, valid) / size.clamp_min(1.0))[:, None])
        elif name == "positions":
            assert lp is not None
            columns.append(_position_bins(lp, valid, bins))
        elif name in stats:  # a per-row signal: its per-token mean
            columns.append(_masked_mean(stats[name], valid)[:, None])
        else:  # pragma: no cover - a sequence-only entry of SIGNALS needs its reduction here
            raise ConfigurationError(f"sequence signal {name!r} has no reduction")
    return torch.cat(columns, dim=1)


def _check_k(k: Any) -> float:
    ok = isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < float(k) <= 1
    if not ok:
        raise ConfigurationError(f"`k` must be a number in (0, 1], got {k!r}")
    return float(k)


def _check_bins(bins: Any) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigurationError(f"`bins` must be a positive int, got {bins!r}")
    return bins


def logit_budget(device: torch.device | str) -> int:
    """Logits one forward pass may return on ``device``: sized from its free memory.

    A quarter of the memory free now (on the CPU, also within the container's memory limit),
    at 8 bytes per logit (float32 logits and one copy), clipped to
    :data:`LOGIT_BUDGET_BOUNDS`; :data:`DEFAULT_MAX_LOGIT_ELEMENTS` where free memory cannot
    be read. The model's own activations are not counted: a batch that does not fit after
    all is retried at half its size.

    Example:
        >>> low, high = LOGIT_BUDGET_BOUNDS
        >>> low <= logit_budget("cpu") <= high
        True
    """
    device = torch.device(device)
    free: int | None = None
    try:
        if device.type == "cuda":
            free = int(torch.cuda.mem_get_info(device)[0])
        elif device.type == "cpu" and hasattr(os, "sysconf"):
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
            room = _container_room()
            if room is not None:
                free = min(free, room)
    except (OSError, ValueError, RuntimeError):  # not reported on this platform
        free = None
    if free is None or free <= 0:
        return DEFAULT_MAX_LOGIT_ELEMENTS
    low, high = LOGIT_BUDGET_BOUNDS
    return int(min(high, max(low, free // 4 // 8)))


def _container_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (``None`` without one).

    The process's own cgroup (from ``/proc/self/cgroup``; v2, then v1's memory controller),
    its limit less its use, counting reclaimable file cache (``inactive_file``) as free.
    """
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            folder, names = "/sys/fs/cgroup" + path, ("memory.max", "memory.current",
                                                      "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            folder, names = "/sys/fs/cgroup/memory" + path, (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            with open(f"{folder}/{names[0]}") as f:
                limit = f.read().strip()
            with open(f"{folder}/{names[1]}") as f:
                usage = int(f.read().strip())
            cache = 0
            with open(f"{folder}/memory.stat") as f:
                for stat in f:
                    key, _, value = stat.partition(" ")
                    if key == names[2]:
                        cache = int(value)
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max", or v1's "no limit" value
            return None
        return max(0, int(limit) - usage + cache)
    return None


def _check_elements(name: str, value: Any, *, auto: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = 'a positive int or "auto"' if auto else "a positive int"
        raise ConfigurationError(f"`{name}` must be {allowed}, got {value!r}")
    return value


_FORWARD_OPTIONS: dict[type, tuple[bool, bool]] = {}


def _forward_options(model: nn.Module) -> tuple[bool, bool]:
    """Whether ``model.forward`` names ``attention_mask`` and ``use_cache`` parameters."""
    kind = type(model)
    if kind not in _FORWARD_OPTIONS:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            params = {}  # type: ignore[assignment]
        _FORWARD_OPTIONS[kind] = ("attention_mask" in params, "use_cache" in params)
    return _FORWARD_OPTIONS[kind]


def forward_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pass_attention_mask: bool | None = None,
) -> torch.Tensor:
    """Run ``model`` on token ids and return its ``[B, T, V]`` logits.

    ``attention_mask`` is passed as a keyword when ``pass_attention_mask`` is True, or when
    it is None and ``model.forward`` has a parameter named ``attention_mask`` (Hugging Face
    models, or your own); ``use_cache=False`` likewise when ``forward`` takes ``use_cache``
    (a probe never generates, so no key/value cache is kept). The caller provides the
    no-grad, eval-mode context (see :func:`fesmia_hooks.untouched`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5))
        >>> forward_logits(model, torch.zeros(2, 3, dtype=torch.long)).shape
        torch.Size([2, 3, 5])
    """
    takes_mask, takes_cache = _forward_options(model)
    kwargs: dict[str, Any] = {}
    send_mask = takes_mask if pass_attention_mask is None else pass_attention_mask
    if send_mask and attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if takes_cache:
        kwargs["use_cache"] = False
    logits = extract_logits(model(input_ids, **kwargs))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ProbeError(
            "a causal language model must return [batch, length, vocab] logits for token ids "
            f"of shape {tuple(input_ids.shape)}, got {tuple(logits.shape)}"
        )
    return logits


class SequenceSignals:
    """A ``signal_fn`` for :class:`~fesmia_hooks.FeSMIA` that picks the sequence signals.

    ``FeSMIA(signal_fn=SequenceSignals(("log_prob", "min_k", "zlib")))`` reads these
    signals from a text canary set. Without it, a text canary set gets the probe's
    ``signals`` (by default ``phi``, ``log_prob``, ``margin``, ``neg_entropy``) computed per
    token and averaged. With ``method="threshold"`` the first signal ranks the canaries
    (``learner_options={"signal_index": i}`` picks another column).

    The probe calls it with the attention mask and the zlib lengths of the canaries; called
    directly as ``signal_fn(model, input_ids, targets)`` it takes the mask to be the scored
    positions and their successors, and computes the zlib lengths of those tokens.

    Args:
        names: Signals, from :data:`SEQUENCE_SIGNALS`.
        k: Share of tokens that ``min_k`` averages, in (0, 1].
        bins: Columns of ``positions``.
        max_logit_elements: Most logits asked of the model at once, or ``"auto"``: sized
            from the memory free on the model's device at each check (:func:`logit_budget`;
            see the module docstring for the memory bound).
        chunk_elements: Most logits reduced at once.
        pass_attention_mask: ``None`` passes ``attention_mask=`` when ``model.forward`` names
            it; True or False force it.

    Example:
        >>> import fesmia_hooks as fh
        >>> probe = fh.FeSMIA(signal_fn=SequenceSignals(("min_k", "zlib"), k=0.1))
        >>> probe.signal_fn
        SequenceSignals(names=('min_k', 'zlib'), k=0.1, bins=4)
    """

    def __init__(
        self,
        names: Sequence[str] = DEFAULT_SEQUENCE_SIGNALS,
        *,
        k: float = 0.2,
        bins: int = 4,
        max_logit_elements: int | Literal["auto"] = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        pass_attention_mask: bool | None = None,
    ) -> None:
        self.names = _check_names(names)
        self.k = _check_k(k)
        self.bins = _check_bins(bins)
        self.max_logit_elements: int | Literal["auto"] = (
            "auto" if isinstance(max_logit_elements, str) and max_logit_elements == "auto"
            else _check_elements("max_logit_elements", max_logit_elements, auto=True)
        )
        self.chunk_elements = _check_elements("chunk_elements", chunk_elements)
        if pass_attention_mask is not None and not isinstance(pass_attention_mask, bool):
            raise ConfigurationError(
                f"`pass_attention_mask` must be None or a bool, got {pass_attention_mask!r}"
            )
        self.pass_attention_mask = pass_attention_mask

    def __repr__(self) -> str:
        return f"SequenceSignals(names={self.names}, k={self.k}, bins={self.bins})"

    @property
    def width(self) -> int:
        """Columns of the signal matrix."""
        return len(self.names) + (self.bins - 1 if "positions" in self.names else 0)

    def column_of(self, name: str) -> int:
        """The signal matrix's column of signal ``name`` (the first of ``positions``' bins).

        Raises:
            ConfigurationError: When ``name`` is not one of :attr:`names`.

        Example:
            >>> SequenceSignals(("positions", "zlib"), bins=3).column_of("zlib")
            3
        """
        if name not in self.names:
            raise ConfigurationError(
                f"signal {name!r} is not among these sequence signals; allowed: {self.names}"
            )
        before = self.names[: self.names.index(name)]
        return len(before) + (self.bins - 1 if "positions" in before else 0)

    def settings(self) -> dict[str, Any]:
        """The signals, as plain values (a probe's settings hold them).

        Example:
            >>> SequenceSignals(("min_k",), k=0.1).settings()
            {'names': ['min_k'], 'k': 0.1, 'bins': 4}
        """
        return {"names": list(self.names), "k": self.k, "bins": self.bins}

    def rows_per_forward(
        self,
        length: int,
        vocab_size: int,
        batch_size: int,
        device: torch.device | str = "cpu",
    ) -> int:
        """Sequences per forward pass so that at most ``max_logit_elements`` logits come back.

        Example:
            >>> SequenceSignals(max_logit_elements=2**24).rows_per_forward(1024, 50257, 256)
            1
            >>> SequenceSignals(max_logit_elements=2**28).rows_per_forward(128, 50257, 256)
            41
        """
        budget = (logit_budget(device) if self.max_logit_elements == "auto"
                  else self.max_logit_elements)
        return max(1, min(batch_size, budget // max(1, length * vocab_size)))

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor | None,
        *,
        attention_mask: torch.Tensor | None = None,
        zlib_bytes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Signals ``[B, width]`` of the token ids ``inputs`` against ``targets``."""
        if targets is None:
            raise ConfigurationError("sequence signals need next-token targets, got None")
        if attention_mask is None:
            scored = targets != IGNORE_INDEX
            attention_mask = scored.clone()
            attention_mask[:, 1:] |= scored[:, :-1]
            attention_mask = attention_mask.long()
        if zlib_bytes is None and "zlib" in self.names:
            zlib_bytes = zlib_lengths(inputs, attention_mask)
        logits = forward_logits(
            model, inputs, attention_mask, pass_attention_mask=self.pass_attention_mask
        )
        return self.reduce(logits, targets, zlib_bytes=zlib_bytes)

    def reduce(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        zlib_bytes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Signals ``[B, width]`` of ready ``[B, T, V]`` logits (see :func:`sequence_signals`)."""
        return sequence_signals(
            logits,
            targets,
            self.names,
            k=self.k,
            zlib_bytes=zlib_bytes,
            bins=self.bins,
            chunk_elements=self.chunk_elements,
        )


def zlib_lengths(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    decode: Callable[[list[int]], str | bytes] | None = None,
    texts: Sequence[str | bytes] | None = None,
) -> torch.Tensor:
    """zlib-compressed length in bytes of each sequence's unmasked tokens, ``[N]`` float32.

    With ``decode`` (e.g. ``tokenizer.decode``) the decoded text is compressed, as Carlini
    et al. (2021) do (``texts``: the sequences already decoded, by :func:`decoded_texts`);
    otherwise the unmasked token ids, packed in the fewest bytes per id that hold the
    largest id of ``input_ids`` (one byte for a byte- or character-level vocabulary, where
    that is the text itself).

    Example:
        >>> ids = torch.tensor([[7] * 64, list(range(64))])
        >>> repetitive, varied = zlib_lengths(ids, torch.ones_like(ids)).tolist()
        >>> repetitive < 20 < 64 < varied
        True
    """
    if texts is None and decode is not None:
        texts = decoded_texts(input_ids, attention_mask, decode)
    if texts is not None:
        sizes = [zlib_length(text) for text in texts]
    else:
        cpu_ids, cpu_mask = input_ids.detach().cpu().long(), attention_mask.detach().cpu().bool()
        top = int(cpu_ids.max()) if cpu_ids.numel() else 0
        dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
        sizes = [zlib_length(row[keep].numpy().astype(dtype).tobytes())
                 for row, keep in zip(cpu_ids, cpu_mask, strict=True)]
    return torch.tensor(sizes, dtype=torch.float32, device=input_ids.device)


def decoded_texts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decode: Callable[[list[int]], str | bytes],
) -> list[str | bytes]:
    """``decode`` of each sequence's unmasked tokens.

    A ``decode`` that raises gives a :class:`~fesmia_hooks.ConfigurationError` naming the
    exception's type only: its message, which may quote canary tokens, is left out.

    Example:
        >>> decoded_texts(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]),
        ...               lambda ids: "".join("xab"[i] for i in ids))
        ['ab']
    """
    cpu_ids, cpu_mask = input_ids.detach().cpu().long(), attention_mask.detach().cpu().bool()
    texts: list[str | bytes] = []
    for row, keep in zip(cpu_ids, cpu_mask, strict=True):
        failed = None
        try:
            text = decode([int(v) for v in row[keep]])
        except Exception as exc:  # noqa: BLE001 - any failure of the user's decode
            failed = type(exc).__name__
        if failed is not None:
            # Its message may quote the canary tokens it failed on: give its type only, raised
            # outside the handler so that no traceback chains the original.
            raise ConfigurationError(
                f"`decode` raised {failed} on a canary sequence (its message is left out: it "
                "may quote canary tokens); check that it takes a list of token ids"
            )
        if not isinstance(text, (str, bytes)):
            raise ConfigurationError(
                f"`decode` must return str or bytes, got {type(text).__name__}"
            )
        texts.append(text)
    return texts
