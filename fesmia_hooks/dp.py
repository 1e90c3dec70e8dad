"""Differential privacy beside the attack: the accountant's ε and the audit's lower bound.

A run trained with DP-SGD has an *upper* bound on ε from its accountant (Opacus's
``PrivacyEngine``); canaries included by independent coins give an empirical *lower*
bound (:mod:`fesmia_hooks.epsilon`). A monitor reads both at every check, for one δ, into
the report's ``epsilon_accountant`` and ``epsilon_lower_bound``: a lower bound above the
accountant's ε means the DP implementation or its accounting is broken; the gap between
them is how loose the accountant is (or how weak the attack). Nothing here imports Opacus.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from fesmia_hooks.canaries import Canaries
from fesmia_hooks.epsilon import epsilon_lower_bound
from fesmia_hooks.exceptions import ConfigurationError

__all__ = ["Accountant", "accountant_epsilon", "check_accountant", "epsilon_readings"]

#: An Opacus ``PrivacyEngine`` or accountant (anything with ``get_epsilon(delta)``), or a
#: function ``fn(delta) -> float``.
Accountant = Any


def check_accountant(accountant: Any) -> None:
    """Raise a :class:`~fesmia_hooks.ConfigurationError` unless ``accountant`` can give ε.

    Example:
        >>> check_accountant(lambda delta: 1.0)
        >>> check_accountant(3.0)
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: `accountant` must have get_epsilon(delta) (an Opacus PrivacyEngine or accountant) or be a function of delta, got float
    """  # noqa: E501
    if accountant is None:
        return
    if callable(getattr(accountant, "get_epsilon", None)) or callable(accountant):
        return
    raise ConfigurationError(
        "`accountant` must have get_epsilon(delta) (an Opacus PrivacyEngine or accountant) "
        f"or be a function of delta, got {type(accountant).__name__}"
    )


def accountant_epsilon(accountant: Any, delta: float, *, warned: set[str] | None = None
                       ) -> float:
    """The accountant's ε for ``delta`` now; NaN (with a warning) if it cannot say.

    ``warned`` collects the kinds of failure already warned about (one warning each); a
    monitor keeps its own.

    Example:
        >>> accountant_epsilon(lambda delta: 2.5, 1e-5)
        2.5
    """
    if accountant is None:
        return math.nan
    try:
        get = getattr(accountant, "get_epsilon", None)
        value = float(get(delta) if callable(get) else accountant(delta))
    except Exception as exc:  # noqa: BLE001 - an accountant failing must not kill training
        why = type(exc).__name__
        if warned is None or why not in warned:
            if warned is not None:
                warned.add(why)
            warnings.warn(
                f"fesmia-hooks: the accountant could not give ε ({why}); "
                "epsilon_accountant reads NaN", stacklevel=3,
            )
        return math.nan
    return value if value >= 0 else math.nan


def epsilon_readings(
    audit_scores: np.ndarray,
    canaries: Canaries | None,
    *,
    delta: float,
    confidence: float,
    accountant: float,
) -> dict[str, float]:
    """The report's ε fields for one check.

    The lower bound is computed only for canaries with ``random_inclusion`` and one
    label-free score each; otherwise it reads NaN (nothing can be claimed).

    Example:
        >>> import math
        >>> out = epsilon_readings(np.empty(0), None, delta=1e-5, confidence=0.95,
        ...                        accountant=math.nan)
        >>> math.isnan(out["epsilon_lower_bound"])
        True
    """
    out = {"epsilon_lower_bound": math.nan, "epsilon_confidence": math.nan,
           "epsilon_delta": math.nan, "epsilon_accountant": accountant}
    if (canaries is not None and canaries.random_inclusion
            and len(audit_scores) == len(canaries)):
        bound = epsilon_lower_bound(audit_scores, canaries.is_member.numpy(), delta=delta,
                                    confidence=confidence)
        out.update(epsilon_lower_bound=bound.epsilon, epsilon_confidence=confidence,
                   epsilon_delta=delta)
    if math.isfinite(accountant):
        out["epsilon_delta"] = delta
    return out
