"""fesmia-hooks: watch a model's privacy leakage while it trains.

FeS-MIA (Jiménez-López et al., 2025) runs membership inference as a few-shot task on a small
canary set; Log-MIA reads it on a log scale at (near) zero false positives. Canaries are
samples of a classifier (:class:`CanarySet`) or token sequences of a causal language model
(:class:`SequenceCanarySet`, :mod:`fesmia_hooks.text`). This package is the
framework-neutral core; adapters for Lightning, Keras 3 and plain PyTorch loops live in
:mod:`fesmia_hooks.integrations`.

Example:
    >>> import fesmia_hooks as fh
    >>> fh.chance_log_mia(15)
    LogMIA(strict=0.1780..., relaxed=0.5883...)
"""

from fesmia_hooks.budget import Decision, LeakageBudget, StopReason
from fesmia_hooks.calibration import Calibration
from fesmia_hooks.canaries import Canaries, CanarySet
from fesmia_hooks.epsilon import EpsilonBound, epsilon_lower_bound
from fesmia_hooks.exceptions import (
    CanaryError,
    ConfigurationError,
    FesmiaError,
    PrivacyBudgetExceeded,
    ProbeError,
)
from fesmia_hooks.guard import untouched
from fesmia_hooks.learners import register_learner
from fesmia_hooks.logmia import LogMIA, chance_log_mia, log_mia, roc_counts
from fesmia_hooks.measurement import Measurement
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA, Probe
from fesmia_hooks.report import LeakageReport, Level, LevelBands
from fesmia_hooks.sequences import SequenceCanarySet
from fesmia_hooks.sequential import SequentialTest
from fesmia_hooks.signals import classification_signals, extract_logits
from fesmia_hooks.sinks import JsonlSink, NullSink, Sink, TensorBoardSink, sinks_for
from fesmia_hooks.text import SequenceSignals, sequence_signals

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "Canaries",
    "CanaryError",
    "CanarySet",
    "ConfigurationError",
    "Decision",
    "EpsilonBound",
    "FeSMIA",
    "FesmiaError",
    "JsonlSink",
    "LeakageBudget",
    "LeakageReport",
    "Level",
    "LevelBands",
    "LogMIA",
    "Measurement",
    "NullSink",
    "PrivacyBudgetExceeded",
    "PrivacyMonitor",
    "Probe",
    "ProbeError",
    "SequenceCanarySet",
    "SequenceSignals",
    "SequentialTest",
    "Sink",
    "StopReason",
    "TensorBoardSink",
    "chance_log_mia",
    "epsilon_lower_bound",
    "classification_signals",
    "extract_logits",
    "log_mia",
    "register_learner",
    "roc_counts",
    "sequence_signals",
    "sinks_for",
    "untouched",
]
