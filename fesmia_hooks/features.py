"""Turn a model and a canary set into the feature matrix the few-shot learners read."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.exceptions import ConfigurationError, ProbeError
from fesmia_hooks.guard import model_device, untouched
from fesmia_hooks.signals import DEFAULT_SIGNALS, SignalFn, classification_signals, extract_logits
from fesmia_hooks.text import (
    DEFAULT_SEQUENCE_SIGNALS,
    SEQUENCE_SIGNALS,
    SequenceSignals,
    forward_logits,
)

__all__ = ["FeatureKind", "Features", "compute_features"]

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


def _find_layer(model: nn.Module, name: str) -> nn.Module:
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
    canaries: CanarySet,
    *,
    kind: FeatureKind = "signals",
    signals: Sequence[str] | None = None,
    embedding_layer: str | None = None,
    signal_fn: SignalFn | None = None,
    batch_size: int = 256,
    rows: torch.Tensor | None = None,
) -> Features:
    """Forward the canary pool through ``model`` without touching training.

    Runs under :func:`~fesmia_hooks.guard.untouched`, in batches of ``batch_size``, on the
    model's own device (the canaries are moved there once and cached).

    Token-sequence canaries (:meth:`CanarySet.from_sequences`) take the language-model path
    of :mod:`fesmia_hooks.text`: the model gets the token ids (and ``attention_mask=`` when
    its ``forward`` names it) and returns ``[B, T, V]`` logits; ``signals`` are then the
    per-token signals averaged over the scored tokens, or whatever a
    :class:`~fesmia_hooks.text.SequenceSignals` given as ``signal_fn`` asks for; batches
    are cut so that at most ``max_logit_elements`` logits come back at once; and an
    embedding layer whose output is ``[B, T, D]`` is averaged over the unmasked positions
    (for the paper's text features, "logits averaged over positions", name the output
    layer).

    Args:
        model: The victim.
        canaries: The canary pool.
        kind: Which features to return.
        signals: Built-in signals to compute (ignored with ``signal_fn``); ``None`` picks
            the canaries' kind's default, :data:`~fesmia_hooks.signals.DEFAULT_SIGNALS` for
            a classifier and :data:`~fesmia_hooks.text.DEFAULT_SEQUENCE_SIGNALS` for token
            sequences.
        embedding_layer: Name of the submodule whose output is the embedding.
        signal_fn: ``signal_fn(model, inputs, targets) -> Tensor[B, F]`` replacing the
            built-in signals; it is called inside the same guard. For token sequences
            ``inputs`` are the token ids and ``targets`` the next-token targets.
        batch_size: Canaries per forward pass (at most).
        rows: Only these canaries (pool indices, members first), in this order; a rank's
            share under several processes (see :mod:`fesmia_hooks.distributed`).

    Returns:
        The :class:`Features` (raw, not yet normalised over the pool).
    """
    if kind in ("embeddings", "both") and embedding_layer is None:
        raise ConfigurationError(
            f"features={kind!r} needs `embedding_layer`, the name of the layer to read"
        )
    if canaries.is_sequence:
        return _sequence_features(
            model,
            canaries,
            kind=kind,
            signals=signals,
            embedding_layer=embedding_layer,
            signal_fn=signal_fn,
            batch_size=batch_size,
            subset=rows,
        )
    signals = DEFAULT_SIGNALS if signals is None else tuple(signals)
    device = model_device(model)
    x, y = _select_rows(canaries.on(device), rows)
    if signal_fn is None and kind != "embeddings" and y is None:
        raise ConfigurationError(
            "the built-in classification signals need canary labels; give (inputs, labels) "
            "pairs or pass `signal_fn`"
        )
    captured: list[torch.Tensor] = []
    handle = None
    if kind in ("embeddings", "both"):
        layer = _find_layer(model, str(embedding_layer))

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = extract_logits(output)
            captured.append(tensor.reshape(tensor.shape[0], -1))

        handle = layer.register_forward_hook(hook)
    sig_parts: list[torch.Tensor] = []

    def block(start: int, stop: int) -> None:
        xb = x[start:stop]
        yb = None if y is None else y[start:stop]
        if signal_fn is not None:
            seen = len(captured)
            sig_parts.append(_check_signal_block(signal_fn(model, xb, yb), len(xb)))
            if handle is not None and len(captured) == seen:
                model(xb)
            return
        out = model(xb)
        if kind != "embeddings":
            assert yb is not None
            sig_parts.append(classification_signals(extract_logits(out), yb, signals))

    try:
        with untouched(model):
            _in_batches(x.shape[0], batch_size, block, [sig_parts, captured])
    finally:
        if handle is not None:
            handle.remove()
    return _finish(sig_parts, captured, kind)


_OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _in_batches(
    n: int,
    batch_size: int,
    block: Any,
    outputs: list[list[torch.Tensor]],
) -> None:
    """Call ``block(start, stop)`` over ``range(n)`` in batches, halving them on out-of-memory.

    A batch that does not fit is dropped from ``outputs`` and retried at half the size, down
    to one sample; the smaller size is kept for the rest of the pass.
    """
    start, size = 0, batch_size
    while start < n:
        stop = min(start + size, n)
        lengths = [len(out) for out in outputs]
        try:
            block(start, stop)
        except _OutOfMemory as exc:
            for out, length in zip(outputs, lengths, strict=True):
                del out[length:]
            if size == 1:
                raise ProbeError("one canary does not fit in the device's memory") from exc
            size = max(1, size // 2)
            _warn_once(f"the canary batch did not fit in memory; retrying with {size} per batch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"fesmia-hooks: {message}", stacklevel=4)


def _select_rows(tensors: tuple[Any, ...], rows: torch.Tensor | None) -> tuple[Any, ...]:
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


def _sequence_features(
    model: nn.Module,
    canaries: CanarySet,
    *,
    kind: FeatureKind,
    signals: Sequence[str] | None,
    embedding_layer: str | None,
    signal_fn: SignalFn | None,
    batch_size: int,
    subset: torch.Tensor | None,
) -> Features:
    """:func:`compute_features` for token-sequence canaries (see :mod:`fesmia_hooks.text`)."""
    signals = DEFAULT_SEQUENCE_SIGNALS if signals is None else tuple(signals)
    device = model_device(model)
    ids, targets = _select_rows(canaries.on(device), subset)
    _, mask, zlib_bytes = _select_rows(canaries.sequences_on(device), subset)
    assert targets is not None
    spec: SequenceSignals | None = None
    if isinstance(signal_fn, SequenceSignals):
        spec = signal_fn
    elif signal_fn is None:
        unknown = [n for n in signals if n not in SEQUENCE_SIGNALS]
        if unknown:
            raise ConfigurationError(
                f"signal(s) {unknown} have no sequence form; allowed for token sequences: "
                f"{', '.join(SEQUENCE_SIGNALS)}"
            )
        spec = SequenceSignals(tuple(signals))
    length = ids.shape[1]
    captured: list[torch.Tensor] = []
    current_mask: list[torch.Tensor] = []
    handle = None
    if kind in ("embeddings", "both"):
        layer = _find_layer(model, str(embedding_layer))

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = extract_logits(output)
            block_mask = current_mask[-1]
            if tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(block_mask.shape):
                weight = block_mask.to(tensor.dtype)[..., None]
                tensor = (tensor * weight).sum(1) / weight.sum(1).clamp_min(1)
            captured.append(tensor.reshape(tensor.shape[0], -1).float())

        handle = layer.register_forward_hook(hook)
    pass_mask = None if spec is None else spec.pass_attention_mask
    vocab = canaries.vocab_size
    if spec is None:
        rows = batch_size
    elif vocab is not None:
        rows = spec.rows_per_forward(length, vocab, batch_size)
    else:
        rows = 1  # learn the vocabulary's size from one sequence first
    sig_parts: list[torch.Tensor] = []
    try:
        with untouched(model):
            start = 0
            while start < ids.shape[0]:
                block = slice(start, start + rows)
                xb, yb, mb = ids[block], targets[block], mask[block]
                current_mask.append(mb)
                if spec is None:
                    assert signal_fn is not None
                    seen = len(captured)
                    sig_parts.append(_check_signal_block(signal_fn(model, xb, yb), len(xb)))
                    if handle is not None and len(captured) == seen:
                        forward_logits(model, xb, mb)
                else:
                    logits = forward_logits(model, xb, mb, pass_attention_mask=pass_mask)
                    if vocab is None:
                        vocab = int(logits.shape[-1])
                        rows = spec.rows_per_forward(length, vocab, batch_size)
                    if kind != "embeddings":
                        sig_parts.append(spec.reduce(logits, yb, zlib_bytes=zlib_bytes[block]))
                    del logits
                start = block.stop
    finally:
        if handle is not None:
            handle.remove()
    return _finish(sig_parts, captured, kind)


def _check_signal_block(block: object, rows: int) -> torch.Tensor:
    if not isinstance(block, torch.Tensor):
        raise ProbeError(f"`signal_fn` must return a tensor, got {type(block).__name__}")
    if block.dim() == 1:
        block = block[:, None]
    if block.dim() != 2 or block.shape[0] != rows:
        raise ProbeError(
            f"`signal_fn` must return [batch={rows}, features], got {tuple(block.shape)}"
        )
    return block.float()
