"""What the probe reads from the victim: per-sample signals and optional embeddings.

Every signal is computed in log space from the logits, never through softmax probabilities,
so that a saturated model (members at probability 1.0 in float32) still separates members from
non-members (SCIENCE.md, trap 3). Signals are oriented so that *higher means more member-like*.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fesmia_hooks.exceptions import ConfigurationError, ProbeError

__all__ = [
    "CLASSIFICATION_SIGNALS",
    "DEFAULT_SIGNALS",
    "SignalFn",
    "classification_signals",
    "extract_logits",
]

SignalFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: Names of the built-in classification signals, each "higher = more member-like".
CLASSIFICATION_SIGNALS: tuple[str, ...] = (
    "phi",
    "log_prob",
    "margin",
    "neg_entropy",
    "max_logit_gap",
)
#: The signals a classifier's canaries get unless told otherwise.
DEFAULT_SIGNALS: tuple[str, ...] = ("phi", "log_prob", "margin", "neg_entropy")


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
    unknown = [n for n in names if n not in CLASSIFICATION_SIGNALS]
    if unknown:
        raise ConfigurationError(
            f"unknown signal(s) {unknown}; allowed: {', '.join(CLASSIFICATION_SIGNALS)}"
        )
    z = logits.float()
    if z.dim() != 2:
        raise ProbeError(f"classification logits must be [batch, classes], got {tuple(z.shape)}")
    if z.shape[1] < 2:
        raise ProbeError(f"classification logits need at least 2 classes, got {z.shape[1]}")
    y = targets.long().reshape(-1, 1)
    outside = int(((y < 0) | (y >= z.shape[1])).sum())
    if outside:
        raise ProbeError(
            f"{outside} canary label(s) fall outside the model's {z.shape[1]} classes"
        )
    z_y = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, float("-inf"))
    out: dict[str, Callable[[], torch.Tensor]] = {
        "phi": lambda: z_y - torch.logsumexp(others, dim=1),
        "log_prob": lambda: z_y - torch.logsumexp(z, dim=1),
        "margin": lambda: z_y - others.amax(dim=1),
        "neg_entropy": lambda: (torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1),
        "max_logit_gap": lambda: (lambda t: t[:, 0] - t[:, 1])(z.topk(2, dim=1).values),
    }
    return torch.stack([out[n]() for n in names], dim=1)
