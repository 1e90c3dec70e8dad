"""Every error fesmia-hooks raises, under one base class.

Configuration errors (bad arguments, bad canary data) subclass :class:`ValueError`; failures
while a run is going on subclass :class:`RuntimeError`. Catch :class:`FesmiaError` to catch all.
"""

from __future__ import annotations

__all__ = [
    "CanaryError",
    "ConfigurationError",
    "FesmiaError",
    "PrivacyBudgetExceeded",
    "ProbeError",
]


class FesmiaError(Exception):
    """Base class of every error raised by fesmia-hooks."""


class ConfigurationError(FesmiaError, ValueError):
    """An argument is out of its allowed range or of the wrong type."""


class CanaryError(FesmiaError, ValueError):
    """The canary data is unusable: wrong shapes, dtypes, labels, sizes or overlaps."""


class ProbeError(FesmiaError, RuntimeError):
    """A privacy check failed while it ran (for example, the model returned no logits)."""


class PrivacyBudgetExceeded(FesmiaError, RuntimeError):
    """Raised by a monitor whose budget has ``action="raise"`` when leakage crosses it.

    Attributes:
        report: The :class:`~fesmia_hooks.LeakageReport` of the check that crossed the budget.
        reason: The human-readable reason.
    """

    def __init__(self, reason: str, report: object | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report
