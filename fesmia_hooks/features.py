"""Turn a model and a canary set into the feature matrix the few-shot learners read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.exceptions import ConfigurationError, ProbeError
from fesmia_hooks.guard import model_device, untouched
from fesmia_hooks.signals import SignalFn, classification_signals, extract_logits

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
    signals: Sequence[str] = ("phi", "log_prob", "margin", "neg_entropy"),
    embedding_layer: str | None = None,
    signal_fn: SignalFn | None = None,
    batch_size: int = 256,
) -> Features:
    """Forward the canary pool through ``model`` without touching training.

    Runs under :func:`~fesmia_hooks.guard.untouched`, in batches of ``batch_size``, on the
    model's own device (the canaries are moved there once and cached).

    Args:
        model: The victim.
        canaries: The canary pool.
        kind: Which features to return.
        signals: Built-in classification signals to compute (ignored with ``signal_fn``).
        embedding_layer: Name of the submodule whose output is the embedding.
        signal_fn: ``signal_fn(model, inputs, targets) -> Tensor[B, F]`` replacing the
            built-in signals; it is called inside the same guard.
        batch_size: Canaries per forward pass.

    Returns:
        The :class:`Features`.
    """
    if kind in ("embeddings", "both") and embedding_layer is None:
        raise ConfigurationError(
            f"features={kind!r} needs `embedding_layer`, the name of the layer to read"
        )
    device = model_device(model)
    x, y = canaries.on(device)
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
    try:
        with untouched(model):
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size]
                yb = None if y is None else y[start : start + batch_size]
                if signal_fn is not None:
                    seen = len(captured)
                    sig_parts.append(_check_signal_block(signal_fn(model, xb, yb), len(xb)))
                    if handle is not None and len(captured) == seen:
                        model(xb)
                    continue
                out = model(xb)
                if kind != "embeddings":
                    assert yb is not None
                    sig_parts.append(classification_signals(extract_logits(out), yb, signals))
    finally:
        if handle is not None:
            handle.remove()
    sig = torch.cat(sig_parts).float() if sig_parts else None
    emb = torch.cat(captured).float() if captured else None
    if kind == "embeddings":
        sig = None
    for name, t in (("signals", sig), ("embeddings", emb)):
        if t is not None and not torch.isfinite(t).all():
            raise ProbeError(f"the model produced non-finite {name} on the canary set")
    return Features(signals=sig, embeddings=emb)


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
