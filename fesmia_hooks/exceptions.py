"""Every error fesmia-hooks raises, under one base class.

Configuration errors (bad arguments, bad canary data) subclass :class:`ValueError`; failures
while a run is going on subclass :class:`RuntimeError`. Catch :class:`FesmiaError` to catch all.
"""

from __future__ import annotations

import re

__all__ = [
    "CanaryError",
    "ConfigurationError",
    "FesmiaError",
    "PrivacyBudgetExceeded",
    "ProbeError",
    "describe_error",
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


# A number standing alone (not part of a name such as float32, cuda:0 or a 64x4 shape), in
# any of Python's spellings: 987, -987.25, .25, 9.8e2, 0x3DB, 987.25j, 987.25f.
_BARE_NUMBER = re.compile(
    r"(?<![\w.])(?<!cuda:)(?<!mps:)(?<!xpu:)[-+]?"
    r"(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?[jJfF]?)(?!\w|\.\d)"
)
# A quoted piece of text (a dictionary key, a word a lookup failed on): data, withheld.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def describe_error(exc: BaseException, *, with_kind: bool = True) -> str:
    """One line about an error that tells its cause without quoting canary data.

    fesmia-hooks' own messages never hold canary data. Any other message may quote the
    values of the input that failed (an index, a token id, a value a model's assertion
    printed), so only its first line is kept (a TorchScript error's last, after its
    traceback), and every number standing alone is withheld; names with digits in them stay
    (``float32``, ``cuda:0``, a ``64x4`` shape), so a dtype, device, shape or
    missing-argument error still says what is wrong.

    Example:
        >>> describe_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x4 and 8x3)"))
        'RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x4 and 8x3)'
        >>> describe_error(IndexError("index 987 is out of bounds for dimension 0 with size 50"))
        'IndexError: index # is out of bounds for dimension # with size #'
        >>> describe_error(ValueError("input out of range: 987.25 (expected float32)"))
        'ValueError: input out of range: # (expected float32)'
        >>> describe_error(ValueError("token id 50257. value:0.5 on cuda:0"))
        'ValueError: token id #. value:# on cuda:0'
        >>> describe_error(KeyError("zanzibar"))
        "KeyError: '…'"
        >>> describe_error(ValueError("bad 0x3DB, .25, 987.25j and 987.25f in float16"))
        'ValueError: bad #, #, # and # in float16'
    """  # noqa: E501
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    torchscript = any(line.startswith("Traceback of TorchScript") for line in lines)
    text = (lines[-1] if torchscript else lines[0]) if lines else "(no message)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # no terminal colours
    if not isinstance(exc, FesmiaError):
        if isinstance(exc, LookupError) and exc.args and not isinstance(exc.args[0], str):
            text = "(a key or index; withheld)"  # KeyError(987) and the like: the key is data
        text = _BARE_NUMBER.sub("#", _QUOTED.sub("'…'", text))[:300]
    return f"{type(exc).__name__}: {text}" if with_kind else text
