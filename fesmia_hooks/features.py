"""Turn a model and a canary set into the feature matrix the few-shot learners read.

Each kind of canary set owns its forward pass (``canaries.features(model, ...)``: labelled
samples in :mod:`fesmia_hooks.canaries`, token sequences in :mod:`fesmia_hooks.sequences`);
both run it through :func:`forward_in_batches`, the one batching loop: inside
:func:`~fesmia_hooks.guard.untouched`, with an embedding layer read by a forward hook, and a
batch that does not fit in memory retried at half its size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fesmia_hooks.exceptions import ConfigurationError, ProbeError
from fesmia_hooks.guard import untouched
from fesmia_hooks.signals import SignalFn, extract_logits

if TYPE_CHECKING:  # pragma: no cover
    from fesmia_hooks.canaries import Canaries

__all__ = [
    "FeatureKind",
    "FeatureSpec",
    "Features",
    "check_signal_block",
    "compute_features",
    "find_layer",
    "forward_in_batches",
    "select_rows",
]

FeatureKind = Literal["signals", "embeddings", "both"]


@dataclass(frozen=True)
class Features:
    """Per-canary features, members first, on the model's device.

    Attributes:
        signals: ``[n, S]`` raw signals (higher = more member-like), or None.
        embeddings: ``[n, D]`` flattened layer outputs, or None.
    """

    signals: torch.Tensor | None
    embeddings: torch.Tensor | None

    def matrix(self) -> torch.Tensor:
        """Label-free normalised features for the learners.

        Signals are standardised with the pool's mean and spread; embeddings are centred
        on the pool mean and L2-normalised (SimpleShot's "CL2N"). Both use no labels, so a
        permutation of the membership labels leaves them unchanged.
        """
        parts = []
        if self.signals is not None:
            s = self.signals
            parts.append((s - s.mean(0)) / s.std(0).clamp_min(1e-6))
        if self.embeddings is not None:
            e = self.embeddings - self.embeddings.mean(0)
            e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)
            parts.append(_span_coordinates(e))
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class FeatureSpec:
    """What the probe asks a canary set's forward pass for.

    Attributes:
        kind: Which features to return: ``"signals"``, ``"embeddings"`` or ``"both"``.
        signals: Built-in signals to compute (ignored with ``signal_fn``); ``None`` picks
            the canaries' kind's default.
        embedding_layer: Name of the submodule whose output is the embedding.
        signal_fn: ``signal_fn(model, inputs, targets) -> Tensor[B, F]`` replacing the
            built-in signals; it is called inside the same guard.
        batch_size: Canaries per forward pass (at most).
    """

    kind: FeatureKind = "signals"
    signals: Sequence[str] | None = None
    embedding_layer: str | None = None
    signal_fn: SignalFn | None = None
    batch_size: int = 256


def _span_coordinates(x: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``n`` rows in their own span: every pairwise distance is kept.

    ``n`` points span at most ``n`` dimensions, so a ``[n, D]`` embedding with ``D > n`` is
    rewritten as ``[n, n]`` without changing any distance or inner product; the learners then
    cost the same whatever the layer's width.
    """
    n, d = x.shape
    if d <= n:
        return x
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * s).to(x.dtype)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``, or a clear error."""
    modules = dict(model.named_modules())
    if name not in modules:
        listed = ", ".join(repr(n) for n in list(modules)[1:12])
        raise ConfigurationError(
            f"`embedding_layer` {name!r} is not a submodule of the model; some of its names: "
            f"{listed}"
        )
    return modules[name]


def compute_features(
    model: nn.Module,
    canaries: Canaries,
    spec: FeatureSpec | None = None,
    *,
    rows: torch.Tensor | None = None,
) -> Features:
    """Forward the canary pool through ``model`` without touching training.

    Runs under :func:`~fesmia_hooks.guard.untouched`, in batches of ``spec.batch_size``, on
    the model's own device (the canaries are moved there once and cached). What a forward
    pass is depends on the kind of canaries: see ``CanarySet.features`` (classifier
    samples) and ``SequenceCanarySet.features`` (token sequences of a causal language
    model).

    Args:
        model: The victim.
        canaries: The canary pool.
        spec: What to compute; ``FeatureSpec()`` (the default signals) when omitted.
        rows: Only these canaries (pool indices, members first), in this order; a rank's
            share under several processes (see :mod:`fesmia_hooks.distributed`).

    Returns:
        The :class:`Features` (raw, not yet normalised over the pool).
    """
    spec = spec if spec is not None else FeatureSpec()
    if spec.kind in ("embeddings", "both") and spec.embedding_layer is None:
        raise ConfigurationError(
            f"features={spec.kind!r} needs `embedding_layer`, the name of the layer to read"
        )
    return canaries.features(model, spec, rows=rows)


_OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def forward_in_batches(
    model: nn.Module,
    n: int,
    spec: FeatureSpec,
    *,
    signals_of: Callable[[int, int], torch.Tensor | None],
    forward: Callable[[int, int], object],
    batch_size: int | None = None,
    pool: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    preferred_size: Callable[[], int] | None = None,
) -> Features:
    """The one batching loop of every kind of canary set.

    Calls ``signals_of(start, stop)`` over ``range(n)`` in batches (of ``batch_size``, by
    default ``spec.batch_size``) inside :func:`~fesmia_hooks.guard.untouched`. When
    ``spec`` asks for embeddings, a forward hook on its ``embedding_layer`` captures the
    layer's output for each batch (reduced by ``pool(output, start, stop)`` when given);
    if ``signals_of`` did not run the model (a ``signal_fn`` that does not),
    ``forward(start, stop)`` runs it. A batch that does not fit in memory is dropped and
    retried at half the size, down to one sample; the smaller size is kept for the rest of
    the pass. ``preferred_size()``, asked after each batch, may change the size of the next
    ones (never above the size memory allowed).

    Returns:
        The :class:`Features` of the ``n`` canaries.

    Raises:
        ProbeError: When one canary does not fit in memory, or the features are not finite.
    """
    kind = spec.kind
    captured: list[torch.Tensor] = []
    sig_parts: list[torch.Tensor] = []
    handle = None
    if kind in ("embeddings", "both"):
        layer = find_layer(model, str(spec.embedding_layer))
        where: list[tuple[int, int]] = []

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = extract_logits(output)
            if pool is not None and where:
                tensor = pool(tensor, *where[-1])
            captured.append(tensor.reshape(tensor.shape[0], -1).float())

        handle = layer.register_forward_hook(hook)
    start, size = 0, spec.batch_size if batch_size is None else batch_size
    cap: int | None = None  # the most a batch may hold, once memory has said so
    try:
        with untouched(model):
            while start < n:
                stop = min(start + size, n)
                lengths = (len(sig_parts), len(captured))
                if handle is not None:
                    where.append((start, stop))
                try:
                    block = signals_of(start, stop)
                    if handle is not None and len(captured) == lengths[1]:
                        forward(start, stop)
                except _OutOfMemory as exc:
                    del sig_parts[lengths[0]:], captured[lengths[1]:]
                    if size == 1:
                        raise ProbeError("one canary does not fit in the device's memory") from exc
                    size = cap = max(1, size // 2)
                    _warn_once(
                        f"the canary batch did not fit in memory; retrying with {size} per batch"
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                if block is not None and kind != "embeddings":
                    sig_parts.append(block)
                start = stop
                if preferred_size is not None and start < n:
                    wanted = preferred_size()
                    size = max(1, wanted if cap is None else min(cap, wanted))
    finally:
        if handle is not None:
            handle.remove()
    return _finish(sig_parts, captured, kind)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"fesmia-hooks: {message}", stacklevel=4)


def select_rows(tensors: tuple[Any, ...], rows: torch.Tensor | None) -> tuple[Any, ...]:
    """The given rows of each tensor (``None`` entries stay ``None``)."""
    if rows is None:
        return tensors
    return tuple(None if t is None else t[rows.to(t.device)] for t in tensors)


def _finish(sig_parts: list[torch.Tensor], captured: list[torch.Tensor], kind: str) -> Features:
    sig = torch.cat(sig_parts).float() if sig_parts else None
    emb = torch.cat(captured).float() if captured else None
    if kind == "embeddings":
        sig = None
    for name, t in (("signals", sig), ("embeddings", emb)):
        if t is not None and not torch.isfinite(t).all():
            raise ProbeError(f"the model produced non-finite {name} on the canary set")
    return Features(signals=sig, embeddings=emb)


def check_signal_block(block: object, rows: int) -> torch.Tensor:
    """A ``signal_fn``'s output as ``[rows, F]`` float32, or a clear error."""
    if not isinstance(block, torch.Tensor):
        raise ProbeError(f"`signal_fn` must return a tensor, got {type(block).__name__}")
    if block.dim() == 1:
        block = block[:, None]
    if block.dim() != 2 or block.shape[0] != rows:
        raise ProbeError(
            f"`signal_fn` must return [batch={rows}, features], got {tuple(block.shape)}"
        )
    return block.float()
